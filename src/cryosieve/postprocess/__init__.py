"""Post-processing of two half maps: a stand-in for RELION 3.1's ``relion_postprocess``.

* :mod:`.compute`: the mathematics (masked and phase-randomisation-corrected FSC, resolution, Guinier
  fit, sharpening), arrays in and out;
* :mod:`.files`: reading and checking the maps, writing the outputs and the report files every back-end
  leaves;
* :mod:`.report`: what every post-processing back-end reports (light: no torch).

The package face loads each name on first use, so that reading reports and checking inputs does not load
the computation (torch).
"""

from typing import TYPE_CHECKING

from cryosieve._lazy import lazy_names

if TYPE_CHECKING:
    from cryosieve.postprocess.compute import (
        PostprocessResult,
        SharpeningResult,
        corrected_fsc,
        last_shell_above,
        postprocess,
        randomise_phases_beyond,
        relion_fourier_shell_correlation,
        sharpen_map,
    )
    from cryosieve.postprocess.files import (
        check_inputs,
        check_options,
        output_paths,
        postprocess_files,
        read_inputs,
        write_postprocess,
        write_report_files,
    )
    from cryosieve.postprocess.report import FSC_THRESHOLD, REPORT_FILES, PostprocessReport

_COMPUTE = ("PostprocessResult", "SharpeningResult", "corrected_fsc", "last_shell_above", "postprocess",
            "randomise_phases_beyond", "relion_fourier_shell_correlation", "sharpen_map")
_FILES = ("check_inputs", "check_options", "output_paths", "postprocess_files", "read_inputs", "write_postprocess",
          "write_report_files")
_WHERE = dict.fromkeys(_COMPUTE, "compute") | dict.fromkeys(_FILES, "files")
_WHERE |= dict.fromkeys(("FSC_THRESHOLD", "REPORT_FILES", "PostprocessReport"), "report")
__getattr__ = lazy_names(__name__, _WHERE)

__all__ = ["FSC_THRESHOLD", "REPORT_FILES", "PostprocessReport", "PostprocessResult", "SharpeningResult",
           "check_inputs", "check_options", "corrected_fsc", "last_shell_above", "output_paths", "postprocess",
           "postprocess_files", "randomise_phases_beyond", "read_inputs", "relion_fourier_shell_correlation",
           "sharpen_map", "write_postprocess", "write_report_files"]
