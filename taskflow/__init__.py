"""TaskFlow: a task-management REST and WebSocket API."""

from __future__ import annotations

from quart import Quart
from quart_schema import Info, QuartSchema, tag_blueprint

from . import (
    compression,
    cors,
    db,
    delivery,
    errors,
    idempotency,
    limits,
    logs,
    passwords,
    server_errors,
    ws,
)
from .blueprints import auth, ops, projects, tasks, webhooks
from .config import Config
from .jsonio import JSONRequest, ORJSONProvider
from .openapi import BEARER, TaskFlowOpenAPIProvider

__version__ = "0.1.0"

MAX_BODY_BYTES = 1024 * 1024

schema = QuartSchema(
    info=Info(title="TaskFlow", version=__version__),
    openapi_provider_class=TaskFlowOpenAPIProvider,
    redoc_ui_path=None,
    scalar_ui_path=None,
    swagger_ui_path="/docs",
    # A login's access token, or an API token (bearerFormat is a hint only).
    security_schemes={
        BEARER: {"type": "http", "scheme": "bearer", "bearer_format": "JWT or tfp_ API token"}
    },
)


def create_app(config: Config | None = None) -> Quart:
    """Build the app from *config*, or from the environment when none is given."""
    config = config or Config.from_env()
    server_errors.install()  # hypercorn's own 400 and 431 as problem+json
    logs.configure_logging(config.log_level)

    app = Quart(__name__, static_folder=None)
    # `//projects` is not `/projects`: one spelling per resource.
    app.url_map.merge_slashes = False
    app.request_class = JSONRequest
    app.config.update(
        TASKFLOW=config,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        # OPTIONS would answer every route without authentication: a CORS
        # preflight is answered by cors.py, any other OPTIONS is a plain 405.
        PROVIDE_AUTOMATIC_OPTIONS=False,
        QUART_SCHEMA_SWAGGER_JS_URL="/docs/assets/swagger-ui-bundle.js",
        QUART_SCHEMA_SWAGGER_CSS_URL="/docs/assets/swagger-ui.css",
    )

    logs.init_app(app)  # first: its hooks wrap everyone else's
    compression.init_app(app)  # second: its hook runs after every other but the access log's
    schema.init_app(app)
    # quart-schema installs its own JSON provider; responses here are orjson's.
    app.json = ORJSONProvider(app)
    passwords.init_app(app, config.bcrypt_rounds)
    db.init_app(app, config)
    limits.init_app(app, config)  # before errors: a refused request is counted too
    errors.init_app(app)
    idempotency.init_app(app)  # after db and limits: see its docstring
    cors.init_app(app, config)  # after the limiter: preflights are counted too

    for blueprint, tag in (
        (ops.blueprint, "operations"),
        (auth.blueprint, "auth"),
        (projects.blueprint, "projects"),
        (tasks.blueprint, "tasks"),
        (webhooks.blueprint, "webhooks"),
    ):
        tag_blueprint(blueprint, [tag])
        app.register_blueprint(blueprint)
    ws.init_app(app)
    delivery.init_app(app)  # after db: see its docstring
    return app
