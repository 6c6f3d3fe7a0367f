"""Which images have an attribute: MNIST's digits ('3'), or a column of a labels file in the format of CelebA's
list_attr_celeba.txt: a line with the image count, a line of attribute names, then one line per image, its
file name and a 1 (has it) or -1 (has not) per attribute."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import Tensor

from vaegan_dist.config import TrainConfig
from vaegan_dist.data.folder import split_files
from vaegan_dist.data.images import DATA_NAMES, LABELLED, images_dir, load_labelled
from vaegan_dist.data.mnist import DataError


def read_attribute_file(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """(the attribute names, each file name's values)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the labels file {path} ({err}): give list_attr_celeba.txt or a file like "
                        "it") from None
    if len(lines) < 3:
        raise DataError(f"the labels file {path} has no images: a count, the attribute names, then a line per image")
    names = lines[1].split()
    table = {}
    for number, line in enumerate(lines[2:], 3):
        if not line.strip():
            continue
        file, *values = line.split()
        if len(values) != len(names) or not all(v in ("1", "-1", "0") for v in values):
            raise DataError(f"{path} line {number} does not give {len(names)} values of 1 or -1: fix that line")
        table[file] = [int(v) for v in values]
    return names, table


def has_attribute(config: TrainConfig, attribute: str, labels_file: Path | None = None,
                  data_dir: str | None = None) -> Tensor:
    """For each test image of config's data set (load_images' order), whether it has the attribute: bool (N,)."""
    if config.dataset in LABELLED:
        if attribute not in [str(label) for label in range(10)]:
            kind = "a digit" if config.dataset == "mnist" else "a class"
            raise DataError(f"attribute {attribute!r}: on {DATA_NAMES[config.dataset]} an attribute is {kind}, 0 to 9")
        return load_labelled(config.dataset, images_dir(config, data_dir), "test")[1] == int(attribute)
    if labels_file is None:
        raise DataError("an attribute of a folder's images needs --labels FILE (CelebA's list_attr_celeba.txt)")
    names, table = read_attribute_file(labels_file)
    if attribute not in names:
        close = difflib.get_close_matches(attribute, names, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else f": {labels_file} has {', '.join(names)}"
        raise DataError(f"attribute {attribute!r} is not in {labels_file}{hint}")
    column = names.index(attribute)
    files = split_files(images_dir(config, data_dir), "test")
    if missing := [file.name for file in files if file.name not in table]:
        raise DataError(f"{labels_file} has no line for {missing[0]} (and {len(missing) - 1} more test images)")
    return torch.tensor([table[file.name][column] > 0 for file in files])
