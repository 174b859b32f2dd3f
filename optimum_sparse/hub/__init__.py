"""Model cards and Hub pushes for pruned models."""

from .card import build_model_card, plot_layers, reproduce_commands, validate_model_card, write_model_card
from .push import HubPushError, push_folder, push_pruned_model, resolve_endpoint
from ..serialization import register_card_writer

register_card_writer(write_model_card, push_folder)  # the save path writes the card through hub, hub is not imported by it

__all__ = [
    "build_model_card", "write_model_card", "plot_layers", "reproduce_commands", "validate_model_card",
    "HubPushError", "push_folder", "push_pruned_model", "resolve_endpoint",
]
