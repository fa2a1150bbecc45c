"""The bottom layer: the conf, the error family and its CLI harness, work_dir layout and file names, atomic
I/O, logging, devices and torchrun. Imports nothing else of the toolkit's; everything above imports from it."""
