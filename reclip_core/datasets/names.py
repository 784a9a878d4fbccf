"""The names of the dataset readers: one list, used by the configs, the class lists and the CLI."""

#: the five benchmarks of the paper, in its table order
BENCHMARK_NAMES = ("voc", "context", "ade", "cityscapes", "coco_stuff27")
#: every reader ``get_dataset`` knows
DATASET_NAMES = BENCHMARK_NAMES + ("toyworld", "folder")
