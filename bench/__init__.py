"""bench.py's modes, one module each: loader, augment, loop (model and train), syncs, explain,
readme, scale; meter holds what they share (the Meter, sweeps, the JSON / markdown / chart report) and cli
the command line. The package names each mode's command cmd_<mode>: cli.main runs it by that name.
"""
from bench.augment import cmd_augment
from bench.cli import DESCRIPTIONS, main
from bench.explain import cmd_explain
from bench.loader import cmd_loader
from bench.loop import cmd_model, cmd_train, model_only_recipe
from bench.meter import BLUE, GREY, chart, print_table
from bench.readme import BEGIN, END, cmd_readme
from bench.scale import cmd_scale
from bench.syncs import cmd_syncs

__all__ = ["BEGIN", "BLUE", "DESCRIPTIONS", "END", "GREY", "chart", "cmd_augment", "cmd_explain", "cmd_loader",
           "cmd_model", "cmd_readme", "cmd_scale", "cmd_syncs", "cmd_train", "main", "model_only_recipe", "print_table"]
