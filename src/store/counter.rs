//! The counter hash, one per (user, period): the only Rust code that knows its field names. The
//! scripts in `lua/` are the other side of the same layout (`lua/common.lua` describes it).
//!
//! | field | what |
//! |---|---|
//! | `<type>` | the count of a usage type |
//! | `v` | the version: grows on every change, so Postgres can refuse an older total; a hash without it is not loaded from Postgres yet |
//! | `p`, `pv` | the user's plan and its version in Postgres' `user_plans` |
//! | `m:<type>:<name>` | a summed numeric metadata value |
//! | `s:<type>:<name>` | the latest other metadata value, as JSON text |
//! | `n:<type>` | how many metadata names the type has |
//! | `o:<type>`, `x:ov` | the owner's limit override of a type (-1 = unlimited), and the overrides' version |
//! | `ov:<type>` | the period's overage of a type: units counted past the limit in force, where the plan allows overage (missing = 0) |
//! | `h:<type>` | units of the type held by open reservations (scripts write it; never flushed: holds live in Redis only) |
//! | `x:next` | set once the next month's counter exists (written by the scripts only) |
//! | `x:dirty` | set exactly while the counter is on its bucket's dirty set (scripts only) |
//! | `e:<type>:<percent>` | a threshold event: "<limit> <used> <plan> <ms>" (consume.lua only) |
//! | `x:ev` | set while the hash holds an event Postgres does not have yet (scripts only) |

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Number, Value};

/// Set while the hash holds a threshold event not yet written to Postgres.
const EVENT_PENDING: &str = "x:ev";

/// A threshold event as the consume script recorded it in a counter hash
/// (`e:<type>:<percent>`, see `record_thresholds` in `lua/common.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The usage type.
    pub usage_type: String,
    /// The threshold, in percent of the limit.
    pub threshold: u32,
    /// The limit in force when it fired.
    pub limit: i64,
    /// The count the firing call reached.
    pub used: i64,
    /// The plan in force then.
    pub plan: String,
    /// When (Redis' clock, ms since the epoch).
    pub at_ms: i64,
}

impl Fired {
    /// Reads one `e:` field; `None` for a field not written by the script (corrupt data).
    fn parse(field: &str, value: &str) -> Option<Fired> {
        let (usage_type, threshold) = field.strip_prefix("e:")?.rsplit_once(':')?;
        let mut parts = value.split(' ');
        let fired = Fired {
            usage_type: usage_type.to_owned(),
            threshold: threshold.parse().ok()?,
            limit: parts.next()?.parse().ok()?,
            used: parts.next()?.parse().ok()?,
            plan: parts.next()?.to_owned(),
            at_ms: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(fired)
    }
}

/// The version field.
const VERSION: &str = "v";
/// The plan field and its version.
const PLAN: &str = "p";
const PLAN_VERSION: &str = "pv";
/// Field names a usage type may not take: the hash's own.
pub const RESERVED: [&str; 3] = [VERSION, PLAN, PLAN_VERSION];
/// The prefix of a type's overage field.
const OVERAGE: &str = "ov:";
/// The prefix of a type's hold (`h:<type>`).
const HELD: &str = "h:";

/// One type's row of a counter, as Postgres stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The usage type.
    pub usage_type: String,
    /// The count.
    pub count: i64,
    /// The period's overage (units past the limit; see `lua/common.lua`'s `past_limit`).
    pub overage: i64,
    /// Metadata: sums as JSON numbers, other values as sent.
    pub metadata: Value,
}

/// One counter hash, parsed into what it means.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CounterHash {
    /// `v`; `None` when the hash is not loaded (or gone).
    pub version: Option<i64>,
    /// `p` and `pv`, when the hash carries a plan.
    pub plan: Option<(String, i64)>,
    /// Counts by type; `None` for a count that is not a whole number (corrupt data: quotad never
    /// writes one, and the scripts refuse to count on it).
    counts: BTreeMap<String, Option<i64>>,
    /// Metadata by type, as Postgres stores it: sums as JSON numbers (whole sums as integers),
    /// other values as the JSON they were sent as. A name both summed and kept as text keeps the
    /// sum.
    metadata: BTreeMap<String, Map<String, Value>>,
    /// Limit overrides by type (`o:<type>`).
    overrides: BTreeMap<String, i64>,
    /// The threshold events recorded, when one of them is not yet in Postgres (`x:ev`); else
    /// empty (those in Postgres need not be written again).
    events: Vec<Fired>,
    /// Overage by type (`ov:<type>`); a field that is not a whole number reads as 0.
    overage: BTreeMap<String, i64>,
    /// Units held by open reservations, by type (`h:<type>`).
    holds: BTreeMap<String, i64>,
}

impl CounterHash {
    /// Reads a hash as `HGETALL` returns it (empty when the key does not exist).
    pub fn parse(fields: &HashMap<String, String>) -> CounterHash {
        let mut hash = CounterHash {
            version: fields.get(VERSION).and_then(|v| v.parse().ok()),
            plan: fields
                .get(PLAN_VERSION)
                .and_then(|pv| pv.parse().ok())
                .and_then(|pv| Some((fields.get(PLAN)?.clone(), pv))),
            ..CounterHash::default()
        };
        for (key, value) in fields {
            if !key.contains(':') && !RESERVED.contains(&key.as_str()) {
                hash.counts.insert(key.clone(), value.parse().ok());
            }
        }
        for (key, value) in fields {
            if let (Some(ty), Ok(limit)) = (key.strip_prefix("o:"), value.parse()) {
                hash.overrides.insert(ty.to_owned(), limit);
            }
            if let (Some(ty), Ok(units)) = (key.strip_prefix(OVERAGE), value.parse()) {
                hash.overage.insert(ty.to_owned(), units);
            }
            if let (Some(ty), Ok(held)) = (key.strip_prefix(HELD), value.parse()) {
                hash.holds.insert(ty.to_owned(), held);
            }
        }
        if fields.contains_key(EVENT_PENDING) {
            hash.events = fields
                .iter()
                .filter(|(k, _)| k.starts_with("e:"))
                .filter_map(|(k, v)| Fired::parse(k, v))
                .collect();
            hash.events
                .sort_by(|a, b| (&a.usage_type, a.threshold).cmp(&(&b.usage_type, b.threshold)));
        }
        // In field order, so the same hash always makes the same metadata, in the same order.
        let mut meta: Vec<(&String, &String)> = fields
            .iter()
            .filter(|(k, _)| k.starts_with("m:") || k.starts_with("s:"))
            .collect();
        meta.sort();
        for (key, value) in meta {
            let Some((kind, rest)) = key.split_once(':') else {
                continue;
            };
            let Some((ty, name)) = rest.split_once(':') else {
                continue;
            };
            let parsed = match kind {
                "m" => number(value),
                _ if fields.contains_key(&format!("m:{ty}:{name}")) => None,
                _ => Some(
                    serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.clone())),
                ),
            };
            if let Some(v) = parsed {
                hash.metadata
                    .entry(ty.to_owned())
                    .or_default()
                    .insert(name.to_owned(), v);
            }
        }
        hash
    }

    /// Whether the hash is loaded from Postgres (it carries a version).
    pub fn is_loaded(&self) -> bool {
        self.version.is_some()
    }

    /// The limit override of `usage_type` (`o:<type>`: a limit, or -1 for unlimited), if the
    /// owner has one.
    pub fn limit_override(&self, usage_type: &str) -> Option<i64> {
        self.overrides.get(usage_type).copied()
    }

    /// Every usage type the hash holds a count for, in name order.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.counts.keys().map(String::as_str)
    }

    /// The count of `usage_type` (0 when the hash holds none, or one that is not a number).
    pub fn count(&self, usage_type: &str) -> i64 {
        self.counts.get(usage_type).copied().flatten().unwrap_or(0)
    }

    /// The threshold events of `usage_type` to write to Postgres (none unless some event of the
    /// hash is not there yet), in threshold order.
    pub fn events_of<'a>(&'a self, usage_type: &'a str) -> impl Iterator<Item = &'a Fired> + 'a {
        self.events
            .iter()
            .filter(move |e| e.usage_type == usage_type)
    }

    /// Units of `usage_type` held by open reservations (0 when none, or not a number).
    pub fn held(&self, usage_type: &str) -> i64 {
        self.holds.get(usage_type).copied().unwrap_or(0)
    }

    /// The period's overage of `usage_type` (0 when none).
    pub fn overage(&self, usage_type: &str) -> i64 {
        self.overage.get(usage_type).copied().unwrap_or(0)
    }

    /// The Postgres rows of the hash: one for every type with a whole count, in type order.
    pub fn rows(&self) -> Vec<Row> {
        self.counts
            .iter()
            .filter_map(|(ty, count)| {
                let meta = self.metadata.get(ty).cloned().unwrap_or_default();
                Some(Row {
                    usage_type: ty.clone(),
                    count: (*count)?,
                    overage: self.overage(ty),
                    metadata: Value::Object(meta),
                })
            })
            .collect()
    }

    /// The field of `usage_type`'s overage.
    pub fn overage_field(usage_type: &str) -> String {
        format!("{OVERAGE}{usage_type}")
    }

    /// The fields that give a counter Postgres' row of `usage_type`: its count, its overage (when
    /// not 0), its metadata (numbers as `m:` sums, anything else as `s:` JSON text) and, with
    /// `names`, how many metadata names it has (`n:`, which a load from Postgres sets and a
    /// catch-up keeps).
    pub fn row_fields(
        usage_type: &str,
        count: i64,
        overage: i64,
        metadata: Value,
        names: bool,
    ) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        if overage != 0 {
            fields.push((Self::overage_field(usage_type), overage.to_string()));
        }
        let meta = match metadata {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if names && !meta.is_empty() {
            fields.push((format!("n:{usage_type}"), meta.len().to_string()));
        }
        for (name, value) in meta {
            fields.push(match value {
                Value::Number(n) => (format!("m:{usage_type}:{name}"), n.to_string()),
                other => (format!("s:{usage_type}:{name}"), other.to_string()),
            });
        }
        fields.push((usage_type.to_owned(), count.to_string()));
        fields
    }
}

/// A summed metadata value as JSON: whole numbers stay integers.
fn number(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::Number(i.into()));
    }
    let f: f64 = text.parse().ok()?;
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        return Some(Value::Number((f as i64).into()));
    }
    Number::from_f64(f).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_hash_becomes_one_row_per_type_with_its_metadata() {
        let h = CounterHash::parse(&hash(&[
            ("v", "9"),
            ("p", "PRO"),
            ("pv", "2"),
            ("ai_generation", "12"),
            ("export", "3"),
            ("n:ai_generation", "3"),
            ("m:ai_generation:prompt_tokens", "81200"),
            ("m:ai_generation:cost", "0.25"),
            ("s:ai_generation:model", "\"m-1\""),
            ("x:next", "1"),
        ]));
        assert_eq!(h.version, Some(9));
        assert_eq!(h.plan, Some(("PRO".to_owned(), 2)));
        assert_eq!(h.types().collect::<Vec<_>>(), ["ai_generation", "export"]);
        let rows = h.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].usage_type, "ai_generation");
        assert_eq!(rows[0].count, 12);
        assert_eq!(
            rows[0].metadata,
            serde_json::json!({"prompt_tokens": 81200, "cost": 0.25, "model": "m-1"})
        );
        assert_eq!(
            rows[1],
            Row {
                usage_type: "export".to_owned(),
                count: 3,
                overage: 0,
                metadata: serde_json::json!({})
            }
        );
    }

    #[test]
    fn holds_are_read_beside_counts_and_make_no_row() {
        let h = CounterHash::parse(&hash(&[
            ("v", "3"),
            ("ai_generation", "12"),
            ("h:ai_generation", "30"),
            ("h:export", "x"),
        ]));
        assert_eq!(h.held("ai_generation"), 30);
        assert_eq!(h.held("export"), 0);
        assert_eq!(h.held("kb_file"), 0);
        let rows = h.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].usage_type.as_str(), rows[0].count),
            ("ai_generation", 12)
        );
    }

    #[test]
    fn a_missing_hash_is_not_loaded_and_a_corrupt_count_makes_no_row() {
        let gone = CounterHash::parse(&HashMap::new());
        assert!(!gone.is_loaded());
        assert_eq!(gone.count("ai_generation"), 0);
        let h = CounterHash::parse(&hash(&[("v", "1"), ("export", "x"), ("kb_file", "2")]));
        assert_eq!(h.types().collect::<Vec<_>>(), ["export", "kb_file"]);
        assert_eq!(h.count("export"), 0);
        assert_eq!(h.rows().len(), 1);
    }

    #[test]
    fn events_are_read_only_while_one_is_not_in_postgres_and_junk_is_skipped() {
        let mut fields = hash(&[
            ("v", "3"),
            ("ai_generation", "45"),
            ("e:ai_generation:80", "50 40 FREE 1764000000000"),
            ("e:ai_generation:100", "50 50 FREE 1764000000123"),
            ("e:export:80", "not an event"),
            ("e:ai_generation:x", "50 40 FREE 1"),
        ]);
        let h = CounterHash::parse(&fields);
        assert_eq!(h.events_of("ai_generation").count(), 0);
        fields.insert("x:ev".into(), "1".into());
        let h = CounterHash::parse(&fields);
        let got: Vec<&Fired> = h.events_of("ai_generation").collect();
        assert_eq!(
            got,
            [
                &Fired {
                    usage_type: "ai_generation".into(),
                    threshold: 80,
                    limit: 50,
                    used: 40,
                    plan: "FREE".into(),
                    at_ms: 1_764_000_000_000,
                },
                &Fired {
                    usage_type: "ai_generation".into(),
                    threshold: 100,
                    limit: 50,
                    used: 50,
                    plan: "FREE".into(),
                    at_ms: 1_764_000_000_123,
                },
            ]
        );
        assert_eq!(h.events_of("export").count(), 0);
        // Events are no usage type of their own.
        assert_eq!(h.types().collect::<Vec<_>>(), ["ai_generation"]);
    }

    #[test]
    fn a_name_both_summed_and_text_keeps_the_sum() {
        let h = CounterHash::parse(&hash(&[
            ("v", "1"),
            ("export", "1"),
            ("m:export:size", "5"),
            ("s:export:size", "\"big\""),
        ]));
        assert_eq!(h.rows()[0].metadata, serde_json::json!({"size": 5}));
    }

    #[test]
    fn row_fields_are_what_parse_reads_back() {
        let meta = serde_json::json!({"tokens": 812, "model": "m-1"});
        let fields = CounterHash::row_fields("ai_generation", 7, 2, meta.clone(), true);
        assert_eq!(fields[0], ("ov:ai_generation".to_owned(), "2".to_owned()));
        assert_eq!(fields[1], ("n:ai_generation".to_owned(), "2".to_owned()));
        assert_eq!(
            CounterHash::row_fields("ai_generation", 7, 0, meta.clone(), false).len(),
            3,
            "no overage field for none, no names field without names"
        );
        let mut map: HashMap<String, String> = fields.into_iter().collect();
        map.insert("v".into(), "4".into());
        let h = CounterHash::parse(&map);
        assert_eq!(
            h.rows(),
            [Row {
                usage_type: "ai_generation".to_owned(),
                count: 7,
                overage: 2,
                metadata: meta
            }]
        );
        assert_eq!(h.types().collect::<Vec<_>>(), ["ai_generation"]);
    }

    #[test]
    fn the_plans_file_refuses_a_type_named_like_a_field_of_the_hash() {
        for name in RESERVED {
            let text = crate::plans::BUILT_IN
                .replace("export ", &format!("{name} "))
                .replace("export = ", &format!("{name} = "));
            assert!(
                crate::plans::Plans::parse(&text, "t").is_err(),
                "a usage type named {name} was accepted"
            );
        }
    }

    #[test]
    fn whole_sums_stay_integers_and_fractions_stay_floats() {
        assert_eq!(number("812"), Some(serde_json::json!(812)));
        assert_eq!(number("1624.0"), Some(serde_json::json!(1624)));
        assert_eq!(number("0.5"), Some(serde_json::json!(0.5)));
        assert_eq!(number("x"), None);
    }
}
