"""Every output path of a run, from its prefix (string concatenation, as the published CryoSieve)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryosieve.report import report_paths
from cryosieve.sieve import retention_path, sieve_output_paths


@dataclass(frozen=True)
class OutputNames:
    """Every output path of a run, from its prefix ``prefix``; ``extension``: of the particle files."""

    prefix: str
    extension: str = ".star"  # the particle files' format, the input's: ".star" or ".cs"

    def _path(self, suffix: str) -> Path:
        return Path(self.prefix + suffix)

    def star(self, iteration: int) -> Path:
        """The particle file of set ``iteration`` (``_iter{i}.star``, or ``.cs`` for a ``.cs`` input)."""
        return self._path(f"_iter{iteration}{self.extension}")

    def sieved(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}_sieved{self.extension}")

    def relion_star(self, iteration: int) -> Path:
        """The STAR description of a ``.cs`` set for an external reconstruction program."""
        return self._path(f"_iter{iteration}_relion.star")

    def scores(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}_scores.csv")

    def half_map(self, iteration: int, subset: int) -> Path:
        return self._path(f"_iter{iteration}_half{subset}.mrc")

    def realigned(self, iteration: int) -> Path:
        """Set ``iteration`` with its poses re-estimated before its sieve (``--realign``)."""
        return self._path(f"_iter{iteration}_realigned{self.extension}")

    def realigned_half_map(self, iteration: int, subset: int) -> Path:
        return self._path(f"_iter{iteration}_realigned_half{subset}.mrc")

    def realigned_moves(self, iteration: int) -> Path:
        """How far each particle of set ``iteration`` moved, with its new pose (``--realign``)."""
        return self._path(f"_iter{iteration}_realigned_moves.csv")

    def realigned_iterations(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}_realigned_iterations.csv")

    def realigned_files(self, iteration: int) -> list[Path]:
        return [self.realigned(iteration), self.realigned_half_map(iteration, 1), self.realigned_half_map(iteration, 2),
                self.realigned_moves(iteration), self.realigned_iterations(iteration)]

    def reconstruct_log(self, iteration: int, subset: int) -> Path:
        return self._path(f"_iter{iteration}_reconstruct_half{subset}.txt")

    def postprocess_directory(self, iteration: int) -> Path:
        return self._path(f"_postprocess_iter{iteration}")

    def postprocess_root_name(self, iteration: int) -> str:
        return f"iter{iteration}"

    def postprocess_log(self, iteration: int) -> Path:
        return self._path(f"_postprocess_iter{iteration}.txt")

    @property
    def best(self) -> Path:
        """A copy of the particle file of the run's best set."""
        return self._path(f"_best{self.extension}")

    @property
    def state(self) -> Path:
        return self._path("_state.json")

    @property
    def log(self) -> Path:
        return self._path("_pipeline.log")

    @property
    def lock(self) -> Path:
        return self._path("_run.lock")

    def files(self, num_iters: int, realign: bool = False) -> list[Path]:
        """Every file a run of ``num_iters`` rounds writes (post-processing folders apart; ``realign``: with
        ``--realign``)."""
        paths = [self.star(0), self.state, self.log, self.lock]
        for iteration in range(num_iters):
            if realign:
                paths += self.realigned_files(iteration)
            paths += [self.half_map(iteration, 1), self.half_map(iteration, 2),
                      self.reconstruct_log(iteration, 1), self.reconstruct_log(iteration, 2),
                      self.postprocess_log(iteration), *sieve_output_paths(self.star(iteration + 1)),
                      retention_path(self.star(iteration + 1))]
            if self.extension != ".star":
                paths.append(self.relion_star(iteration))
        report = report_paths(self.prefix)
        paths += [report.summary_csv, report.resolution_plot, report.fsc_plot, report.scores_plot, report.html,
                  report.angles_plot, self.best]
        return paths

    def folders(self, num_iters: int) -> list[Path]:
        """The post-processing folders of a run (each replaced as a whole) and the validation jobs' folder."""
        return [*(self.postprocess_directory(iteration) for iteration in range(num_iters)), self.validation]

    @property
    def validation(self) -> Path:
        """Where the validation jobs of every set go (``--validate``)."""
        return self._path("_validate")

    def owns(self, name: str) -> bool:
        """Whether a file name in the prefix's folder is one of the run's output names."""
        return name.startswith(Path(self.prefix + "x").name[:-1])
