"""The offline demo's scaffolding, kept out of the training core: `prepare` generates its
ProsQA-style data and small model (configs with `prepare.kind`), and `induction` wires the
fact-lookup circuit its model starts from (`prepare.induction_heads`)."""
