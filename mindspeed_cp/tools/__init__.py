"""the mindspeed-cp command."""
