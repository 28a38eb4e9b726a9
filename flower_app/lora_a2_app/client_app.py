"""ClientApp: trains on this SuperNode's partition (node config `partition-id`)."""

from lora_a2.engines.flower import make_client_app

app = make_client_app()
