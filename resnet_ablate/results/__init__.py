"""Reading a study back: its store read-only, each trial a row, and every table, statistic, figure
and report made from them. Reads only; never trains (a model is reloaded only where an analysis
asks for one, analysis.py).

    from resnet_ablate import results
    r = results.load("quickstart")                # the Results of one study (study_results.py)

study_results.py  the Results object and `load`: the facade the modules below serve
store_reading.py  the store opened read-only, each trial as a row
filters.py        the --where language
summaries.py paired.py pareto.py effects.py
                  summaries over seeds (and adaptive seeds' decisions), paired comparisons, Pareto
                  fronts, main effects and interactions; contrasts.py what they share (the
                  statistics themselves: resnet_ablate.stats), left_out.py what their rows are
                  not over (failed and pruned seeds, trials without the metric)
analysis.py       analyses that reload trained models (Fig. 7)
plots.py plot_responses.py plot_axes.py display.py answer.py report.py
                  figures, tables as text with units or exact CSV/JSON, the answer in a few
                  lines, the HTML report
"""

from ..record import DIRECTIONS
from ..storage import ResultsError, default_storage
from .display import FOOTNOTE_COLUMNS, display_frame, footnotes, format_table, write_frame
from .store_reading import ARCH_COLUMNS, STATES, TRIAL_COLUMNS, list_studies
from .study_results import Results, load

__all__ = ["ARCH_COLUMNS", "DIRECTIONS", "FOOTNOTE_COLUMNS", "STATES", "TRIAL_COLUMNS", "Results",
           "ResultsError", "default_storage", "display_frame", "footnotes", "format_table",
           "list_studies", "load", "write_frame"]
