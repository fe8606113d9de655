"""One module per fused op: the custom-op registration (fake kernel + autograd) and the
documented maths."""
