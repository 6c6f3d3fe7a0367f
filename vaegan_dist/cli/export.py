"""`vaegan-export SOURCE OUT`: a checkpoint's encoder and decoder as an export in the Hugging Face format."""

from __future__ import annotations

import torch

from vaegan_dist.checkpoint.output_paths import OutputError, refuse_output
from vaegan_dist.cli.args import ArgumentParser, add_weights_flag
from vaegan_dist.exits import fail
from vaegan_dist.hub.card import LICENSE, run_metrics
from vaegan_dist.hub.model import export_networks
from vaegan_dist.hub.network_files import ExportError, averages_in, averages_note, network_directory, read_networks


def main(argv: list[str] | None = None) -> None:
    """vaegan-export SOURCE OUT: the encoder and decoder of a checkpoint (or a run's newest) as an export in the
    Hugging Face format (VAEGAN.from_pretrained reads it; vaegan-sample and vaegan-eval too), with a model card."""
    parser = ArgumentParser(prog="vaegan-export", description=main.__doc__,
                            examples=["vaegan-export outputs my-model",
                                      "vaegan-export outputs/checkpoints/step_0046850 my-model --dtype float32"])
    parser.add_argument("source", help="a checkpoint directory, or a run's output directory (its newest checkpoint)")
    parser.add_argument("out", help="the export directory to write")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="the weights' type")
    parser.add_argument("--license", default=LICENSE, help="the model card's license, a Hub license id")
    add_weights_flag(parser)
    args = parser.parse_args(argv)
    try:
        source = network_directory(args.source)
        refuse_output(args.out, "the export directory", (args.source, source), directory=True)
        config, encoder, decoder = read_networks(source, weights=args.weights)
        averaged = averages_note(averages_in(source, args.weights))
        card = {"license": args.license, "metrics": run_metrics(source),
                "source": f"Exported by `vaegan-export` from `{source.name}`"
                          + averaged}
        export_networks(encoder, decoder, config, args.out, getattr(torch, args.dtype), card)
    except (ExportError, OutputError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write the export to {args.out} ({err.strerror or err}): choose a writable directory")
    print(f"exported the encoder and decoder of {source} to {args.out}"
          + averaged)


if __name__ == "__main__":
    main()
