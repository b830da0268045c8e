"""The label that marks a position as not trained (the reference's -100, PyTorch's
`ignore_index`): shared by the data pipeline, which writes it, and the loss, which skips it,
without the loss importing the data pipeline."""
IGNORE = -100
