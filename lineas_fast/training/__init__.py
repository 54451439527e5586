"""Training: the LinEAS trainer (``trainer``), its checkpoints (``checkpoints``), the closed-form
fits (``linear_act``: Linear-AcT, mean shift), DSAS gates (``gates``) and per-token reads
(``token_acts``)."""
