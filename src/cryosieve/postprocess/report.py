"""What every post-processing back-end reports, in one form (:class:`PostprocessReport`), and the report
files each leaves (:data:`REPORT_FILES`, written by :func:`cryosieve.postprocess.files.write_report_files`).
Light: the pipeline and the back-ends use it without loading the computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

#: The FSC threshold of the resolution (the "gold standard" 0.143).
FSC_THRESHOLD = 0.143
#: The files every post-processing back-end leaves (keys of :func:`cryosieve.postprocess.files.output_paths`).
REPORT_FILES = ("fsc_csv", "summary", "fsc_plot", "guinier_plot")


@dataclass
class PostprocessReport:
    """What every post-processing back-end reports, in one form.

    ``fsc_table`` and ``guinier`` as in :class:`~cryosieve.postprocess.compute.PostprocessResult` (the Guinier table's
    ``in_fit`` marks the shells of the B-factor fit); ``summary`` as
    :meth:`~cryosieve.postprocess.compute.PostprocessResult.summary` (``final_resolution_angstrom``, ``bfactor``,
    ``guinier_fit_slope``, ``guinier_fit_intercept``, ...); ``box`` in voxels.
    """

    fsc_table: pd.DataFrame
    guinier: pd.DataFrame
    summary: dict[str, object]
    box: int
