"""Names of evaluation results shared by the evaluation, the history table and the report (a module
of its own so that reading a table does not import the models that produce it)."""

# the consistency metric as computed here: TF-IDF cosine against the reference attribute texts,
# IDF fitted on WikiText-2 (not comparable with the papers' consistency; docs/EVALUATION.md)
CONSISTENCY_KEY = "consistency_ref_attr_wt2"
