"""The PBX adapter (websockets): AppWebsocket sessions that carry EpSignal for devices."""
