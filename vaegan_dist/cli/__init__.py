"""The console scripts: vaegan-train, -eval, -sample, -export and -report, and the command line they share."""
