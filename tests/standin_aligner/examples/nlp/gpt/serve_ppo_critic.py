"""STAND-IN for NeMo-Aligner's examples/nlp/gpt/serve_ppo_critic.py (tests only).

Rank 0 serves HTTP on trainer.ppo.port (all addresses of the node) until it is stopped; every
POST is answered with JSON naming this critic, so the actor can prove it reached it. Other ranks
wait, as NeMo's non-serving ranks do. SIGTERM (the sbatch script stopping the critic once the
actor is done) is logged and ends the process with status 0.
"""

import json
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standin_common import check_forced_failure, check_layout, check_nemo, die, get, load_config, log, rank

NAME = "critic"


class Handler(BaseHTTPRequestHandler):
    """Answers POST /infer with {"critic": host, "port": ..., "rewards": one per sample}."""

    def do_POST(self):  # noqa: N802 (the http.server API)
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        samples = request.get("samples", [])
        body = json.dumps({"critic": socket.gethostname(), "port": self.server.server_address[1],
                           "rewards": [float(len(s)) for s in samples]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        log(NAME, f"answered {self.client_address[0]}: {len(samples)} samples")

    def log_message(self, *args):  # the one line above is enough
        pass


def stop(signum, frame):
    log(NAME, f"stopped by signal {signal.Signals(signum).name}")
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    cfg = load_config(NAME, sys.argv[1:])
    check_forced_failure(NAME)
    check_layout(NAME, cfg)
    check_nemo(NAME, cfg, get(cfg, "pretrained_checkpoint.restore_from_path"))
    if get(cfg, "trainer.ppo.combine_rm_and_critic_server") is not True:  # the rendered layout: one server
        die(NAME, "trainer.ppo.combine_rm_and_critic_server is not true: nothing would serve the reward model")
    if rank() != 0:
        log(NAME, "not rank 0: waiting to be stopped")
        while True:
            time.sleep(1)
    port = get(cfg, "trainer.ppo.port")
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    log(NAME, f"serving on port {port}")
    server.serve_forever()
