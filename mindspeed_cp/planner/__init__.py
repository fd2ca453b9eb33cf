"""mindspeed-cp plan."""
