"""The method's named choices, one list each: the model kinds, the bias ablations, the loss's
divisor, and the two-valued release options (the project's computation first, the release's
second). The modules that compute them check against these and the config schema offers them
(this module imports nothing, so the light config path can read it without torch)."""

#: what is trained: ReCLIP++ (Reference prompt × positional feature, decoder) or ReCLIP (CVPR)
MODEL_KINDS = ("reclip++", "reclip")
#: which bias ReCLIP++ removes: both (the method), only the class or only the space bias (ablations)
BIAS_MODES = ("both", "class", "space")
#: how the mask decoder starts: Kaiming-random (the method) or passing the rectified logits through (a diagnostic)
DECODER_INITS = ("kaiming", "rectified")
#: divisor of a batch's loss: images with a hypothesis (the project) or the batch size (the release)
LOSS_NORMALISATIONS = ("nonempty", "batch")
#: where the Reference prompt's output is read: the end-of-text slot, or the release's argmax slot
READ_SLOTS = ("eot", "release")
#: how a hypothesis window becomes the CLIP input: torch on floats, or the release's PIL on uint8
WINDOW_RESIZES = ("torch", "release")
#: how an evaluation image is resized: torch with antialiasing, or the release's OpenCV-style bilinear
TEST_RESIZES = ("torch", "release")
#: how grid logits reach the label size: crop the padding, or the release's stretch to the unpadded size
UPSAMPLINGS = ("crop", "release")
