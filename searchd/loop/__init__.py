"""The search loop, Ray-free: searchers asked and told, candidates scored through a protocol,
every result recorded; and the stages of a run around it.

- ``SearchLoop`` (``loop``): ask / score / record / tell over one searcher; ``run(scorer)``
  in-process.
- ``Scorer`` / ``Workers`` (``scoring``): the scoring protocol ``score(schedules, seeds) ->
  results`` and what a run asks of the loaded models; ``EvaluatorScorer`` in-process.
- ``Recorder`` (``recorder``): each batch's rows to Parquet, the searcher's state, progress.
- ``to_row`` / ``from_row`` (``record``): the one result record and its Parquet row.
- ``EvaluatorFactory`` / ``EvaluatorHost`` (``factory``): the models loaded once per
  evaluator.
- the run: ``runs`` (run directories), ``checks`` (before anything starts), ``plan``
  (configuration -> space, baselines, searcher, anchors), ``stages`` (setup, search,
  finish), ``finish``, ``adaptive``, ``local`` (the in-process engine), ``hooks`` (fault
  injection).
"""

from searchd.loop.loop import Batch, LoopOutcome, SearchLoop
from searchd.loop.recorder import Progress, Recorder
from searchd.loop.scoring import EvaluatorScorer, Scorer, Workers

__all__ = ["Batch", "EvaluatorScorer", "LoopOutcome", "Progress", "Recorder", "Scorer",
           "SearchLoop", "Workers"]
