"""One thin module per DVC stage: read the inputs, call the library, write the declared outputs.

Root ``dvc.yaml``: ``model``, ``data``, ``covariance`` (one per role and layer); the history report is
derived from the ledger on demand (``editledger report``), not a stage.
Each batch's ``dvc.yaml``: ``keys_values``, ``apply``, ``evaluate``.  The command line runs them as
``editledger stage NAME``; see docs/LEDGER.md for the data flow.
"""
