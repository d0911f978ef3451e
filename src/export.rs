//! The usage export for invoicing: every user's totals of one period, read from Postgres through a
//! server-side cursor a batch at a time and formatted as CSV or JSON lines, so an export of any
//! size runs in the same small memory. `GET /v1/admin/usage/export` sends the stream as its body;
//! `quotad export` writes it to a file or stdout. Both use [`stream`].
//!
//! A period is named as the request names it: `2026-11` is every row whose period *began* in that
//! UTC calendar month (whatever the row's own bounds: a user whose month runs from the 15th gets
//! the period that began on 15 November), `lifetime` every lifetime row. Rows come by user, type
//! and period start.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use chrono::{DateTime, NaiveDate, SecondsFormat, TimeZone, Utc};
use futures_util::Stream;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::db::{self, ExportRange, ExportRow};
use crate::plans::Plans;

/// Rows read from the cursor per round trip: one chunk of the body (about 150 KB of CSV).
const BATCH: u32 = 1000;
/// The CSV header line.
const CSV_HEADER: &str = "user_id,plan,type,used,overage,metadata,period_start,period_end\r\n";

/// Most exports a daemon streams at once: each holds a Postgres connection (and a transaction)
/// for as long as its client takes to read it.
pub const MAX_EXPORTS: usize = 2;
/// Deadline of one statement of an export: the first FETCH sorts the period's rows, which takes
/// seconds for millions of them; the later ones take milliseconds.
const STATEMENT_DEADLINE: Duration = Duration::from_secs(60);

/// The daemon's exports: connections of their own (the request path's have a deadline of
/// `QUOTAD_DATABASE_TIMEOUT_MS` per statement, and must not be held by a slow download) and
/// the slots that bound how many run at once.
pub struct Exports {
    pool: PgPool,
    slots: Arc<Semaphore>,
}

impl Exports {
    /// Exports on the server and database of `db`.
    pub fn new(db: &PgPool) -> Exports {
        Exports {
            pool: db::pool_like(db, STATEMENT_DEADLINE, MAX_EXPORTS as u32),
            slots: Arc::new(Semaphore::new(MAX_EXPORTS)),
        }
    }

    /// A slot for one export, held until its stream is dropped; `None` when
    /// [`MAX_EXPORTS`] are running. Counted in `quotad_exports_running` while held.
    pub fn slot(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        metrics::gauge!(crate::metrics::EXPORTS_RUNNING).increment(1.0);
        Some(Slot { _permit: permit })
    }

    /// The exports' connections.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// One running export's slot (see [`Exports::slot`]).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::EXPORTS_RUNNING).decrement(1.0);
    }
}

/// The period an export reads, as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPeriod {
    /// `2026-11` or `lifetime`: the name the file is given.
    pub name: String,
    /// The rows it selects.
    pub range: ExportRange,
}

impl ExportPeriod {
    /// Parses `YYYY-MM` (four digits, a dash, two digits, month 01 to 12) or `lifetime`.
    pub fn parse(text: &str) -> Option<ExportPeriod> {
        if text == "lifetime" {
            return Some(ExportPeriod {
                name: text.to_owned(),
                range: ExportRange::Lifetime,
            });
        }
        let b = text.as_bytes();
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        if b.len() != 7 || b[4] != b'-' || !digits(0..4) || !digits(5..7) {
            return None;
        }
        let year: i32 = text[..4].parse().ok()?;
        let month: u32 = text[5..].parse().ok()?;
        let first = |y: i32, m: u32| {
            NaiveDate::from_ymd_opt(y, m, 1).map(|d| Utc.from_utc_datetime(&d.into()))
        };
        let start = first(year, month)?;
        let end = if month == 12 {
            first(year + 1, 1)
        } else {
            first(year, month + 1)
        }?;
        Some(ExportPeriod {
            name: text.to_owned(),
            range: ExportRange::Began { start, end },
        })
    }
}

/// The export's formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// RFC 4180 CSV with a header line; `metadata` is one column of JSON text.
    Csv,
    /// One JSON object per line (`metadata` an object).
    Jsonl,
}

impl Format {
    /// Parses `csv` or `jsonl`.
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Jsonl => "application/x-ndjson",
        }
    }

    /// The format's name, as the request gives it: `csv` or `jsonl`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }

    /// The file name of an export of `period`: `usage-2026-11.csv`.
    pub fn file_name(self, period: &ExportPeriod) -> String {
        format!("usage-{}.{}", period.name, self.name())
    }

    /// Appends `row` as one line.
    fn line(self, row: &ExportRow, out: &mut String) {
        let start = instant(row.period_start);
        let end = row.period_end.map(instant);
        let metadata = row.metadata.to_string();
        match self {
            Format::Csv => {
                let _ = write!(out, "{},", row.user_id);
                csv_field(&row.plan, out);
                out.push(',');
                csv_field(&row.usage_type, out);
                let _ = write!(out, ",{},{},", row.used, row.overage);
                csv_field(&metadata, out);
                let _ = write!(out, ",{start},{}\r\n", end.unwrap_or_default());
            }
            Format::Jsonl => {
                let text = |s: &str| serde_json::Value::from(s).to_string();
                let end = end.map_or_else(|| "null".to_owned(), |e| text(&e));
                let _ = writeln!(
                    out,
                    "{{\"user_id\":\"{}\",\"plan\":{},\"type\":{},\"used\":{},\"overage\":{},\"metadata\":{metadata},\"period_start\":{},\"period_end\":{end}}}",
                    row.user_id,
                    text(&row.plan),
                    text(&row.usage_type),
                    row.used,
                    row.overage,
                    text(&start),
                );
            }
        }
    }
}

/// An instant as the API writes it: RFC 3339, UTC, `Z`, fractions only where there are some.
fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Appends `value` as one CSV field (RFC 4180): quoted when it holds a comma, a quote or a line
/// break, its quotes doubled.
fn csv_field(value: &str, out: &mut String) {
    if value.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// What an export needs from the plans in force: the plan names a stored plan must be one of, and
/// the plan of every other user.
#[derive(Debug, Clone)]
pub struct PlanNames {
    /// The configured plans.
    pub configured: Vec<String>,
    /// The plan of a user with none stored (or one no longer configured).
    pub default_plan: String,
}

impl PlanNames {
    /// From the plans in force.
    pub fn of(plans: &Plans) -> PlanNames {
        PlanNames {
            configured: plans.plan_names.clone(),
            default_plan: plans.default_plan.clone(),
        }
    }
}

/// Begins the export in a transaction of `pool` and opens its cursor: what can fail before a
/// byte is written. The transaction then goes to [`stream`].
pub async fn open(
    pool: &PgPool,
    period: &ExportPeriod,
    plans: &PlanNames,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    db::declare_export(
        &mut tx,
        period.range,
        &plans.configured,
        &plans.default_plan,
    )
    .await?;
    Ok(tx)
}

/// The export's bytes, a batch of rows per item (the CSV header first), read from the cursor
/// [`open`] declared as the consumer asks for them; the transaction ends with the last row. An
/// error ends the stream: what came before it is an incomplete export.
pub fn stream(
    tx: Transaction<'static, Postgres>,
    format: Format,
) -> impl Stream<Item = Result<Bytes, sqlx::Error>> + Send + 'static {
    let header = match format {
        Format::Csv => CSV_HEADER,
        Format::Jsonl => "",
    };
    futures_util::stream::try_unfold(Some((tx, header)), move |state| async move {
        let Some((mut tx, header)) = state else {
            return Ok(None);
        };
        let rows = db::fetch_export(&mut tx, BATCH).await?;
        metrics::counter!(crate::metrics::EXPORT_ROWS, "format" => format.name())
            .increment(rows.len() as u64);
        let mut out = String::with_capacity(header.len() + rows.len() * 160);
        out.push_str(header);
        for row in &rows {
            format.line(row, &mut out);
        }
        let next = if rows.is_empty() {
            tx.commit().await?;
            metrics::counter!(crate::metrics::EXPORTS, "format" => format.name(), "outcome" => "completed")
                .increment(1);
            None
        } else {
            Some((tx, ""))
        };
        Ok(match (out.is_empty(), &next) {
            (true, None) => None,
            _ => Some((Bytes::from(out), next)),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_is_its_calendar_month_and_nothing_else_parses() {
        let p = ExportPeriod::parse("2026-12").unwrap();
        assert_eq!(
            p.range,
            ExportRange::Began {
                start: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
                end: Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
            }
        );
        assert_eq!(
            ExportPeriod::parse("lifetime").unwrap().range,
            ExportRange::Lifetime
        );
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "+202-11",
            "2026-+1",
            "2026_11",
            "life",
            "",
            "２０２６-１１",
            "2026-11 ",
            "abc",
        ] {
            assert_eq!(ExportPeriod::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_csv_field_is_quoted_only_when_it_must_be() {
        let mut out = String::new();
        csv_field("FREE", &mut out);
        out.push('|');
        csv_field("a,\"b\"\nc", &mut out);
        assert_eq!(out, "FREE|\"a,\"\"b\"\"\nc\"");
    }

    #[test]
    fn a_row_is_one_line_in_either_format() {
        let row = ExportRow {
            user_id: uuid::Uuid::nil(),
            plan: "FREE".into(),
            usage_type: "ai_generation".into(),
            used: 12,
            overage: 2,
            metadata: serde_json::json!({"model": "m,\"1\"\n", "tokens": 1.5}),
            period_start: Utc.with_ymd_and_hms(2026, 11, 15, 9, 30, 0).unwrap(),
            period_end: None,
        };
        let mut csv = String::new();
        Format::Csv.line(&row, &mut csv);
        assert_eq!(
            csv,
            "00000000-0000-0000-0000-000000000000,FREE,ai_generation,12,2,\"{\"\"model\"\":\"\"m,\\\"\"1\\\"\"\\n\"\",\"\"tokens\"\":1.5}\",2026-11-15T09:30:00Z,\r\n"
        );
        let mut jsonl = String::new();
        Format::Jsonl.line(&row, &mut jsonl);
        assert!(jsonl.ends_with('\n') && jsonl.matches('\n').count() == 1);
        let parsed: serde_json::Value = serde_json::from_str(&jsonl).unwrap();
        assert_eq!(parsed["metadata"]["model"], "m,\"1\"\n");
        assert_eq!(parsed["period_start"], "2026-11-15T09:30:00Z");
        assert_eq!(parsed["period_end"], serde_json::Value::Null);
        assert_eq!(parsed["used"], 12);
    }
}
