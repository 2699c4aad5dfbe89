from quart.typing import TestClientProtocol as Client

from taskflow import create_app
from taskflow.config import Config

from .support import problem_of


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}


async def test_readyz_reports_each_dependency(client: Client, config: Config) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    expected_redis = "ok" if config.redis_url else "disabled"
    assert await response.get_json() == {"database": "ok", "redis": expected_redis}


async def test_readyz_is_503_naming_what_is_down(environ: dict[str, str]) -> None:
    # Nothing listens on port 1: both dependencies are down.
    environ = {
        **environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/none",
        "TASKFLOW_SECRET_KEY": "k" * 32,
        "REDIS_URL": "redis://127.0.0.1:1/0",
    }
    app = create_app(Config.from_env(environ))
    async with app.test_app():
        response = await app.test_client().get("/readyz")
        body = await response.get_json()
        problem_of(response, body, 503, "service_unavailable")
        assert "database" in body["detail"] and "redis" in body["detail"]
        assert response.headers["Retry-After"]
        # Liveness does not depend on them.
        assert (await app.test_client().get("/healthz")).status_code == 200
