"""One real Serve app (tiny Llama, SmolLM2's real tokenizer, CPU) per test module, with
what the reliability tests compare against: the actors and /dev/shm entries from
before it started. Figures go to ``$RELIABILITY_OUT/<name>.json`` when that is set.

Not a conftest.py: every conftest outside a package is imported as the module
``conftest``, so a second one would replace tests/conftest.py for the
``from conftest import ...`` of every test module collected after it. Test modules
import the ``server`` fixture from here."""

import json
import os
import re
from dataclasses import dataclass, field

import pytest

from bench.faults import wait_healthy
from conftest import free_port
from serve_app import deploy

API_KEY = "reliability-key"
MODEL = "tiny-chat"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 256

# What an error message must never show a client: tracebacks, source paths, actor ids,
# process ids, addresses.
INTERNALS = re.compile(r"Traceback|File \"|/work/|\.py\b|ActorID|actor_id|ActorHandle|"
                       r"\bpid\b|\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")


@dataclass(frozen=True)
class Actor:
    class_name: str
    name: str
    pid: int


@dataclass
class Server:
    url: str
    headers: dict
    actors_before: dict[str, Actor]  # alive before the app started
    shm_before: set[str]
    figures: dict = field(default_factory=dict)
    running: bool = True

    def shutdown(self) -> None:
        from ray import serve

        if self.running:
            self.running = False
            serve.shutdown()


def alive_actors() -> dict[str, Actor]:
    """Alive actors by id, from the GCS (``ray.util.state`` needs the dashboard, which the
    test cluster runs without)."""
    from ray._private import state

    return {actor_id: Actor(a["ActorClassName"], a["Name"], a["Pid"])
            for actor_id, a in state.actors().items() if a["State"] == "ALIVE"}


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def write_figures(name: str, figures: dict) -> None:
    print(f"\n{name}: {json.dumps(figures, indent=1)}")
    out = os.environ.get("RELIABILITY_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(figures, f, indent=1)


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_chat_model):
    from ray import serve

    before = Server(url="", headers={}, actors_before=alive_actors(), shm_before=shm_entries())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deploy({"model": tiny_chat_model, "device": "cpu",
                      "max_model_len": str(MAX_MODEL_LEN), "max_num_seqs": str(MAX_NUM_SEQS),
                      "api_key": API_KEY, "served_model_name": MODEL}),
              name="reliability", route_prefix="/", blocking=False)
    before.url = f"http://127.0.0.1:{port}"
    before.headers = {"Authorization": f"Bearer {API_KEY}"}
    wait_healthy(before.url, 180)
    yield before
    before.shutdown()
