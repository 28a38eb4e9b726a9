"""ServerApp: runs the lora-a2 experiment with per-node payloads (lora_a2.engines.flower)."""

from flwr.serverapp import ServerApp

from lora_a2.engines.flower import deployment_main

app = ServerApp()
app.main()(deployment_main)
