"""Dynamic-convolution layers shared by the model families."""
