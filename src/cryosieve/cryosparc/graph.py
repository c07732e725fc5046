"""The CryoSPARC jobs of one refinement, in order, planned without connecting.

As the original ``cryosieve-csrefine`` 1.3.3 builds them:

1. the particles: ``import_particles`` of a STAR file (``particle_meta_path``, and the folder
   its image names are relative to as ``particle_blob_path``); or, for particles that already are
   CryoSPARC's (a ``.cs`` input), an External job passing through those of the source job's output
   (``uid`` kept, nothing imported);
2. the reference: ``import_volumes`` of ``--ref`` (``volume_blob_path``), or ``homo_abinit`` of the
   particles (its ``volume_class_0``);
3. ``homo_refine_new``, or ``nonuniform_refine_new`` with ``--nu`` (``refine_symmetry``,
   ``refine_gs_resplit``, and ``refine_res_init`` only when ``--ini_high`` is given);
4. with ``--local``, ``new_local_refine`` of that refinement's particles, volume and mask
   (``use_alignment_prior``, ``min_angular_step``).

As in 1.3.3, the particles and the ab-initio reference are made once per input and shared by its
``--repeat`` trials (:attr:`PlannedJob.shared` ``"set"``), and the imported reference once for the run
(``"run"``). The last refinement's ``volume`` and ``particles`` outputs are what is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The step whose outputs are particles, whatever made them, and the output's name.
PARTICLES = "particles"
#: The External job's output of the particles of a .cs input.
SUBSET_OUTPUT = "particles"


@dataclass(frozen=True)
class PlannedJob:
    """One CryoSPARC job: ``step`` (its name in the graph), ``kind`` (the job type, or ``"external"``),
    ``params``, ``connections`` (input -> (step, output)), ``lane`` (``None``: on the master), ``shared``:
    made once for the trials of a set (``"set"``), once for the run (``"run"``), or for each refinement
    (``None``)."""

    step: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    connections: dict[str, tuple[str, str]] = field(default_factory=dict)
    lane: str | None = None
    shared: str | None = None

    def describe(self) -> str:
        inputs = ", ".join(f"{name} <- {step}.{output}" for name, (step, output) in self.connections.items())
        params = ", ".join(f"{name}={value!r}" for name, value in self.params.items())
        shared = {"set": "; shared by the trials of the set", "run": "; shared by the run"}.get(self.shared or "", "")
        return (f"{self.step}: {self.kind}" + (f" on lane {self.lane}" if self.lane else "")
                + (f"; inputs {inputs}" if inputs else "") + (f"; params {params}" if params else "") + shared)


@dataclass(frozen=True)
class RefinementOptions:
    """What ``cryosieve-csrefine`` asks of CryoSPARC: ``lane``, non-uniform refinement (``nu``), a local
    refinement after it (``local``, down to ``min_angular_step`` degrees), ``resplit`` half-sets."""

    lane: str
    nu: bool = False
    local: bool = False
    min_angular_step: float = 0.01
    resplit: bool = False


def refinement_graph(*, star: Path | None, blob_folder: Path, source: tuple[str, str] | None,
                     reference: Path | None, symmetry: str, ini_high: float | None, options: RefinementOptions
                     ) -> list[PlannedJob]:
    """The jobs, in the order they run, of refining the particles of ``star`` (images relative to
    ``blob_folder``), or of the External subset of ``source`` (job id, output) when ``star`` is ``None``;
    ``ini_high`` (Å) is sent as ``refine_res_init`` when given."""
    jobs: list[PlannedJob] = []
    if star is not None:
        jobs.append(PlannedJob(PARTICLES, "import_particles",
                               {"particle_meta_path": str(star), "particle_blob_path": str(blob_folder)},
                               shared="set"))
        particles = (PARTICLES, "imported_particles")
    else:
        assert source is not None
        jobs.append(PlannedJob(PARTICLES, "external", {"passthrough_of": f"{source[0]}.{source[1]}"}, shared="set"))
        particles = (PARTICLES, SUBSET_OUTPUT)
    if reference is not None:
        jobs.append(PlannedJob("reference", "import_volumes", {"volume_blob_path": str(reference)}, shared="run"))
        volume = ("reference", "imported_volume_1")
    else:
        jobs.append(PlannedJob("reference", "homo_abinit", {}, {"particles": particles}, options.lane, shared="set"))
        volume = ("reference", "volume_class_0")
    params: dict[str, Any] = {"refine_symmetry": symmetry, "refine_gs_resplit": options.resplit}
    if ini_high is not None:
        params["refine_res_init"] = ini_high
    jobs.append(PlannedJob("refine", "nonuniform_refine_new" if options.nu else "homo_refine_new", params,
                           {"particles": particles, "volume": volume}, options.lane))
    if options.local:
        jobs.append(PlannedJob("local", "new_local_refine",
                               {"refine_symmetry": symmetry, "use_alignment_prior": True,
                                "min_angular_step": options.min_angular_step},
                               {"particles": ("refine", "particles"), "volume": ("refine", "volume"),
                                "mask": ("refine", "mask")}, options.lane))
    return jobs
