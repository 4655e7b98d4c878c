//! The OpenAPI document of `/api/v1`, derived by utoipa from the handlers' annotations and
//! the types they answer with: it cannot drift from the code.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{conversions, egress, manage, operator, sends};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "paloma",
        description = "Enqueue sends, read campaign figures, pause / resume / cancel campaigns, manage suppressions, report conversions and campaign costs, see what waits and bounce what waits for a domain or campaign. Every route but this document needs `Authorization: Bearer <api.token>`."
    ),
    paths(
        sends::post_sends,
        manage::list_campaigns,
        manage::get_campaign,
        manage::pause,
        manage::resume,
        manage::cancel,
        manage::recipient,
        manage::suppress,
        manage::unsuppress,
        egress::list_sources,
        egress::suspend_domain,
        egress::resume_domain,
        egress::suspended_domains,
        operator::get_queue,
        operator::post_bounces,
        operator::list_bounces,
        operator::lift_bounce,
        conversions::post_conversions,
        conversions::put_cost,
    ),
    modifiers(&Bearer)
)]
pub struct Doc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /api/v1/openapi.json` (no token needed: it holds no data).
pub async fn openapi() -> impl IntoResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOC.get_or_init(|| Doc::openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_the_bearer_scheme_are_in_the_document() {
        let v: serde_json::Value =
            serde_json::from_str(&Doc::openapi().to_json().unwrap()).unwrap();
        for path in [
            "/api/v1/sends",
            "/api/v1/sources",
            "/api/v1/domains/{domain}/suspend",
            "/api/v1/domains/{domain}/resume",
            "/api/v1/domains/suspended",
            "/api/v1/campaigns",
            "/api/v1/campaigns/{campaign}",
            "/api/v1/campaigns/{campaign}/pause",
            "/api/v1/campaigns/{campaign}/resume",
            "/api/v1/campaigns/{campaign}/cancel",
            "/api/v1/recipients/{address}",
            "/api/v1/suppressions/{address}",
            "/api/v1/queue",
            "/api/v1/bounces",
            "/api/v1/conversions",
            "/api/v1/campaigns/{campaign}/cost",
        ] {
            assert!(v["paths"][path].is_object(), "{path} missing");
        }
        assert!(v["paths"]["/api/v1/suppressions/{address}"]["delete"].is_object());
        assert!(v["paths"]["/api/v1/bounces"]["post"].is_object());
        assert!(v["paths"]["/api/v1/bounces"]["get"].is_object());
        assert!(v["paths"]["/api/v1/bounces"]["delete"].is_object());
        assert!(v["components"]["schemas"]["QueueView"].is_object());
        assert!(v["paths"]["/api/v1/conversions"]["post"].is_object());
        assert!(v["paths"]["/api/v1/campaigns/{campaign}/cost"]["put"].is_object());
        assert!(v["components"]["schemas"]["ConversionsAnswer"].is_object());
        assert_eq!(
            v["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let row = &v["components"]["schemas"]["CampaignRow"];
        assert!(row.is_object(), "{}", v["components"]["schemas"]);
    }
}
