"""`vaegan-report OUTPUT_DIR`: a run's loss curves and sample GIF (vaegan_dist.evaluation.report)."""

from __future__ import annotations

from pathlib import Path

from vaegan_dist.checkpoint.output_paths import OutputError, refuse_output
from vaegan_dist.cli.args import ArgumentParser
from vaegan_dist.evaluation.report import ReportError, write_report
from vaegan_dist.exits import fail


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="vaegan-report", description=__doc__.splitlines()[0],
                            examples=["vaegan-report outputs    # outputs/losses.png and outputs/samples.gif"])
    parser.add_argument("output_dir", type=Path, help="a run's --output-dir")
    output_dir = parser.parse_args(argv).output_dir
    if not output_dir.is_dir():
        fail(f"{output_dir} is not a directory: give the output directory of a run")
    try:
        refuse_output(output_dir, "the output directory")
        paths = write_report(output_dir)
    except (ReportError, OutputError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write the pictures into {output_dir} ({err.strerror or err}): make it writable")
    for path in paths:
        print(path)
    if not any(path.suffix == ".gif" for path in paths):
        print(f"no samples.gif: {output_dir / 'samples'} holds no sample pictures yet (a run writes one at the end of "
              "each epoch and at its last step)")


if __name__ == "__main__":
    main()
