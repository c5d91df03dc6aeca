"""What this machine is and what it can do: probes, roofline model, and FlashDecoding++'s offline tuning."""
