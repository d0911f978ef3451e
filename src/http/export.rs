//! `GET /v1/admin/usage/export`: every user's totals of one period, for invoicing, streamed from
//! Postgres as CSV or JSON lines (see [`crate::export`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{short, ApiQuery, AppState};
use crate::db;
use crate::export::{self, ExportPeriod, Format, PlanNames, MAX_EXPORTS};
use crate::http::error::{ApiError, ErrorBody};

/// The formats, as the description lists them.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum FormatName {
    Csv,
    Jsonl,
}

/// Query of `GET /v1/admin/usage/export`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// A month, `2026-11`: every period that began in it (UTC); or `lifetime`: the lifetime
    /// counters.
    #[serde(default)]
    #[param(required = true, value_type = String, pattern = r"^(lifetime|[0-9]{4}-(0[1-9]|1[0-2]))$")]
    period: Option<String>,
    /// `csv` (default) or `jsonl`.
    #[serde(default)]
    #[param(value_type = Option<FormatName>, inline)]
    format: Option<String>,
}

fn parse_period(raw: Option<&str>) -> Result<ExportPeriod, ApiError> {
    let invalid = |why: String| ApiError::invalid("INVALID_PERIOD", "period", why);
    let raw = raw.ok_or_else(|| {
        invalid("period is required: a month such as \"2026-11\", or \"lifetime\".".into())
    })?;
    ExportPeriod::parse(raw).ok_or_else(|| {
        invalid(format!(
            "period {} is not a month such as \"2026-11\" (four digits, a dash, two digits), or \"lifetime\".",
            short(&format!("{raw:?}"))
        ))
    })
}

fn parse_format(raw: Option<&str>) -> Result<Format, ApiError> {
    let Some(raw) = raw else {
        return Ok(Format::Csv);
    };
    Format::parse(raw).ok_or_else(|| {
        ApiError::invalid(
            "INVALID_FORMAT",
            "format",
            format!(
                "format {} is not one quotad writes; use \"csv\" or \"jsonl\".",
                short(&format!("{raw:?}"))
            ),
        )
    })
}

/// `GET /v1/admin/usage/export`: the period's totals of every user.
#[utoipa::path(
    get,
    path = "/v1/admin/usage/export",
    tag = "admin",
    description = "Every user's totals of one period, for invoicing (admin), streamed from Postgres in constant memory, by user, type and period start. Columns (CSV, RFC 4180, with a header line) or fields (JSON lines): user_id, plan (the user's plan in force now: the stored one, else the default), type, used, overage, metadata (the summed numbers, and the latest other values, as the flusher wrote them: JSON text in CSV, an object in JSON lines), period_start, period_end (RFC 3339, UTC; empty or null for lifetime). `period=2026-11` selects every period that began in that UTC month, whatever its bounds; `period=lifetime` the lifetime counters. Figures are Postgres', which trails Redis by up to the flush interval. If Postgres fails mid-stream the body ends without its last chunk (an incomplete transfer, never a shorter valid file). At most 2 run at once.",
    params(ExportQuery),
    responses(
        (status = 200, description = "The export", content((String = "text/csv"), (String = "application/x-ndjson")),
            headers(("Content-Disposition" = String, description = "attachment; filename=\"usage-2026-11.csv\""))),
        (status = 400, description = "A period or format quotad does not know (INVALID_PERIOD, INVALID_FORMAT), or another query parameter (INVALID_QUERY)", body = ErrorBody),
        (status = 403, description = "Needs an admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn usage_export(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let period = parse_period(query.period.as_deref())?;
    let format = parse_format(query.format.as_deref())?;
    let Some(slot) = state.exports.slot() else {
        return Err(ApiError::unavailable(
            "EXPORT_BUSY",
            format!("{MAX_EXPORTS} exports are running, the most quotad streams at once; retry when one has finished."),
        ));
    };
    let plans = PlanNames::of(&state.quota.plans.current());
    let tx = db::within(
        state.quota.db_timeout,
        export::open(state.exports.pool(), &period, &plans),
    )
    .await?;
    let name = period.name.clone();
    let body = export::stream(tx, format)
        .inspect_err(move |e| {
            // The status is sent: ending the body early is the one signal left to the client.
            tracing::error!(error.message = %e, error.cause_chain = ?e, period = %name, "usage export aborted");
            metrics::counter!(crate::metrics::EXPORTS, "format" => format.name(), "outcome" => "aborted")
                .increment(1);
        })
        // The slot is freed when the body is dropped: read to its end, or the client gone.
        .map(move |chunk| {
            let _held = &slot;
            chunk
        });
    let disposition = format!("attachment; filename=\"{}\"", format.file_name(&period));
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_malformed_period_or_format_is_refused_naming_it() {
        for (raw, code) in [
            (None, "INVALID_PERIOD"),
            (Some("2026-13"), "INVALID_PERIOD"),
        ] {
            let e = parse_period(raw).unwrap_err();
            assert_eq!((e.code, e.field.as_deref()), (code, Some("period")));
        }
        assert_eq!(parse_format(None).unwrap(), Format::Csv);
        assert_eq!(parse_format(Some("jsonl")).unwrap(), Format::Jsonl);
        let e = parse_format(Some("xml")).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("INVALID_FORMAT", Some("format"))
        );
    }
}
