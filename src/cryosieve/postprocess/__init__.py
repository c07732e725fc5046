"""Post-processing of two half maps: a stand-in for RELION 3.1's ``relion_postprocess``.

* :mod:`.compute`: the mathematics (masked and phase-randomisation-corrected FSC, resolution, Guinier
  fit, sharpening), arrays in and out;
* :mod:`.files`: reading the maps, writing the outputs and the report files every back-end leaves.
"""

from cryosieve.postprocess.compute import (
    FSC_THRESHOLD,
    PostprocessReport,
    PostprocessResult,
    SharpeningResult,
    check_inputs,
    check_options,
    corrected_fsc,
    last_shell_above,
    postprocess,
    randomise_phases_beyond,
    relion_fourier_shell_correlation,
    sharpen_map,
)
from cryosieve.postprocess.files import (
    REPORT_FILES,
    output_paths,
    postprocess_files,
    read_inputs,
    write_postprocess,
    write_report_files,
)

__all__ = ["FSC_THRESHOLD", "REPORT_FILES", "PostprocessReport", "PostprocessResult", "SharpeningResult",
           "check_inputs", "check_options", "corrected_fsc", "last_shell_above", "output_paths", "postprocess",
           "postprocess_files", "randomise_phases_beyond", "read_inputs", "relion_fourier_shell_correlation",
           "sharpen_map", "write_postprocess", "write_report_files"]
