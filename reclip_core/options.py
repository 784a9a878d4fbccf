"""The method's named choices, one list each: the model kinds, the bias ablations and the loss's
divisor. Method modules check against them and the config schema offers them (this module imports
nothing, so the light config path can read it without torch)."""

#: what is trained: ReCLIP++ (Reference prompt × positional feature, decoder) or ReCLIP (CVPR)
MODEL_KINDS = ("reclip++", "reclip")
#: which bias ReCLIP++ removes: both (the method), only the class or only the space bias (ablations)
BIAS_MODES = ("both", "class", "space")
#: divisor of a batch's loss: images with a hypothesis (the project) or the batch size (the release)
LOSS_NORMALISATIONS = ("nonempty", "batch")
