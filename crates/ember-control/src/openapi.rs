//! The OpenAPI document of REST API v1, generated from the router's own
//! route list ([`crate::api::routes`]) and the wire types' schemas.
//!
//! A copy is checked in at `crates/ember-control/openapi.json`; a test
//! regenerates it and fails when the two differ (set
//! `EMBER_UPDATE_OPENAPI=1` to rewrite the copy).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ember API",
        version = "1",
        description = "Sandboxes in microVMs that pause, resume and fork from templates.\n\n\
            Authenticate with `Authorization: Bearer <API key>`. A sandbox's access token \
            (returned once by the create) may be used instead for that sandbox's exec, \
            process and file endpoints.\n\n\
            Errors are JSON `{code, message, field?}`. Another team's resources answer 404, \
            exactly like missing ones.\n\n\
            Builds (templates and paused sandboxes) live on the host that wrote them: a \
            sandbox from a template starts on a host holding the template's build, and a \
            paused sandbox resumes on the host that paused it."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "sandboxes", description = "Sandbox lifecycle"),
        (name = "processes", description = "Commands in a running sandbox"),
        (name = "files", description = "Files in a running sandbox"),
        (name = "snapshots", description = "Named templates"),
        (name = "templates", description = "Templates built from container images and \
            Dockerfiles: the build runs in a sandbox and snapshots it once its start command \
            is ready; follow a build's log with `offset`"),
        (name = "ports", description = "Servers inside a sandbox. Any request to \
            `/v1/sandboxes/{id}/ports/{port}/…` (or to `{port}-{id}.{domain}` with \
            `--ingress-domain`, or carrying `X-Ember-Sandbox-Id` and `X-Ember-Port`) is \
            proxied to that port in the guest, any method, upgrades included; a private \
            sandbox needs `X-Ember-Traffic-Token` or an API key of its team (docs/ports.md)"),
        (name = "keys", description = "API keys"),
        (name = "teams", description = "Teams (admin)"),
        (name = "hosts", description = "Host agents (admin)"),
        (name = "internal", description = "Used by host agents"),
        (name = "system", description = "Health and metrics"),
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |desc: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(desc.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme("api_key", bearer("An API key, `ember_<prefix>_<secret>`"));
        components.add_security_scheme(
            "access_token",
            bearer("A sandbox's access token, `embersb_<sandbox id>_<secret>`: exec and files of that sandbox only"),
        );
        components.add_security_scheme(
            "join_token",
            bearer("The cluster join token printed by `ember server`"),
        );
    }
}

/// The document's fixed parts, before routes are added.
pub(crate) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, doc) = crate::api::routes().split_for_parts();
    doc
}

/// The whole document as pretty JSON with a trailing newline (the checked-in form).
pub fn document_json() -> String {
    let mut s = document().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}
