//! Overage: how far a plan lets a type's use go past its limit, and the plans file's limit tables
//! that say it (`{ limit = 50, overage = 100 }`, `{ limit = 50, soft = true }`). The counting
//! scripts take it as a cap beside each plan's limit (see `resolve_plan` in `lua/common.lua`);
//! the units counted past the limit are kept per counter (`ov:<type>`, Postgres' `overage`).

/// How far a plan lets a type's use go past its limit. Units past the limit are overage: kept per
/// counter (the answer's `overage`, Postgres' `overage` column) so the product can bill them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overage {
    /// Refused at the limit.
    #[default]
    None,
    /// Allowed up to this many units past the limit, then refused.
    Cap(u64),
    /// Never refused (a soft limit); every unit past the limit is overage.
    Soft,
}

impl Overage {
    /// As the counting scripts take it: the units allowed past the limit, `-1` for no cap.
    pub fn script_arg(self) -> i64 {
        match self {
            Overage::None => 0,
            Overage::Cap(n) => n as i64,
            Overage::Soft => -1,
        }
    }

    /// The inverse of [`Overage::script_arg`] (a script's reply).
    pub fn from_script(n: i64) -> Overage {
        match n {
            0 => Overage::None,
            n if n < 0 => Overage::Soft,
            n => Overage::Cap(n as u64),
        }
    }

    /// Units allowed past the limit: `Some(0)` for none, `None` for no cap (soft).
    pub fn cap(self) -> Option<u64> {
        match self {
            Overage::None => Some(0),
            Overage::Cap(n) => Some(n),
            Overage::Soft => None,
        }
    }
}

/// One plan's limit of one type, as the plans file gives it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimitSpec {
    /// -1 = unlimited.
    pub limit: i64,
    /// How far past it use may go.
    pub overage: Overage,
}

impl LimitSpec {
    /// A whole number (the limit, -1 for unlimited), or a table: `{ limit = N }`,
    /// `{ limit = N, overage = M }` or `{ limit = N, soft = true }`; limit and overage at most
    /// `max`. `Err` is the fault, as a sentence to follow "plan P: type T: ".
    pub(crate) fn read(value: &toml::Value, max: i64) -> Result<LimitSpec, String> {
        const SHAPE: &str = "a limit is a whole number (-1 for unlimited) or a table such as { limit = 50, overage = 100 } or { limit = 50, soft = true }";
        let whole = |key: &str, v: &toml::Value| match v {
            toml::Value::Integer(n) => Ok(*n),
            other => Err(format!(
                "{key} must be a whole number; got {}",
                shown(other)
            )),
        };
        let (limit, overage, soft) = match value {
            toml::Value::Integer(n) => (*n, None, None),
            toml::Value::Table(table) => {
                if let Some(key) = table
                    .keys()
                    .find(|k| !matches!(k.as_str(), "limit" | "overage" | "soft"))
                {
                    return Err(format!(
                        "unknown key {key:?}; a limit table takes limit, and overage or soft"
                    ));
                }
                let Some(limit) = table.get("limit") else {
                    return Err(format!("the table gives no limit; {SHAPE}"));
                };
                let overage = table
                    .get("overage")
                    .map(|v| whole("overage", v))
                    .transpose()?;
                let soft = match table.get("soft") {
                    None => None,
                    Some(toml::Value::Boolean(b)) => Some(*b),
                    Some(other) => {
                        return Err(format!("soft must be true or false; got {}", shown(other)))
                    }
                };
                (whole("limit", limit)?, overage, soft)
            }
            other => return Err(format!("{SHAPE}; got {}", shown(other))),
        };
        if !(-1..=max).contains(&limit) {
            return Err(format!(
                "limit {limit} is out of range; use a whole number from 0 to {max}, or -1 for unlimited"
            ));
        }
        let overage = match (overage, soft) {
            (Some(_), Some(_)) => {
                return Err(
                    "gives both overage and soft; use overage = N for a cap, or soft = true for none"
                        .into(),
                )
            }
            (Some(n), None) if !(0..=max).contains(&n) => {
                return Err(format!(
                    "overage {n} is out of range; use a whole number from 0 to {max} (units allowed past the limit)"
                ))
            }
            (Some(0), None) | (None, Some(false)) | (None, None) => Overage::None,
            (Some(n), None) => Overage::Cap(n as u64),
            (None, Some(true)) => Overage::Soft,
        };
        if limit == -1 && overage != Overage::None {
            return Err(
                "an unlimited limit (-1) takes no overage or soft; give a limit, or remove them"
                    .into(),
            );
        }
        Ok(LimitSpec { limit, overage })
    }
}

/// A TOML value as a plans-file error shows it: a number or boolean as written, text quoted (cut
/// short), anything else by its kind.
fn shown(v: &toml::Value) -> String {
    match v {
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => format!("{f:?}"),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::String(s) => match s.char_indices().nth(40) {
            Some((at, _)) => format!("{:?}…", &s[..at]),
            None => format!("{s:?}"),
        },
        toml::Value::Datetime(_) => "a date".into(),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::{Plans, BUILT_IN};

    fn refused(text: &str) -> String {
        Plans::parse(text, "/etc/quotad/plans.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_limit_table_gives_an_overage_cap_or_a_soft_limit() {
        let text = BUILT_IN
            .replace(
                "ai_generation = 50",
                "ai_generation = { limit = 50, overage = 100 }",
            )
            .replace("export = 10", "export = { limit = 10, soft = true }")
            .replace("kb_file = 20", "kb_file = { limit = 20 }")
            .replace("kb_file = 1000", "kb_file = { limit = 1000, overage = 0, }");
        let plans = Plans::parse(&text, "t").unwrap();
        let ai = plans.usage_type("ai_generation").unwrap();
        assert_eq!(ai.limit("FREE"), Some(50));
        assert_eq!(ai.overage("FREE"), Overage::Cap(100));
        assert_eq!(ai.overage("PRO"), Overage::None);
        let export = plans.usage_type("export").unwrap();
        assert_eq!(export.overage("FREE"), Overage::Soft);
        assert_eq!(
            export.script_limits,
            [
                "ENTERPRISE",
                "-1",
                "0",
                "FREE",
                "10",
                "-1",
                "PRO",
                "-1",
                "0"
            ]
        );
        let kb = plans.usage_type("kb_file").unwrap();
        assert_eq!(
            (kb.limit("FREE"), kb.overage("FREE")),
            (Some(20), Overage::None)
        );
        assert_eq!(
            (kb.limit("PRO"), kb.overage("PRO")),
            (Some(1000), Overage::None)
        );
        assert_eq!(
            ai.script_limits,
            [
                "ENTERPRISE",
                "-1",
                "0",
                "FREE",
                "50",
                "100",
                "PRO",
                "-1",
                "0"
            ]
        );
    }

    #[test]
    fn nonsense_limit_tables_are_refused_naming_plan_type_and_fault() {
        for (value, fault) in [
            ("{ limit = 50, overage = -1 }", "overage -1 is out of range"),
            (
                "{ limit = -1, overage = 10 }",
                "an unlimited limit (-1) takes no overage or soft",
            ),
            (
                "{ limit = -1, soft = true }",
                "an unlimited limit (-1) takes no overage or soft",
            ),
            (
                "{ limit = 50, overage = 10, soft = true }",
                "gives both overage and soft",
            ),
            (
                "{ limit = 50, overage = 10, cap = 3 }",
                "unknown key \"cap\"; a limit table takes limit, and overage or soft",
            ),
            ("{ overage = 10 }", "the table gives no limit"),
            (
                "{ limit = 50, overage = \"lots\" }",
                "overage must be a whole number; got \"lots\"",
            ),
            (
                "{ limit = 50, overage = 2.5 }",
                "overage must be a whole number; got 2.5",
            ),
            ("{ limit = 50.0 }", "limit must be a whole number; got 50.0"),
            (
                "{ limit = 50, soft = \"yes\" }",
                "soft must be true or false; got \"yes\"",
            ),
            ("{ limit = -7, soft = true }", "limit -7 is out of range"),
            (
                "{ limit = 50, overage = 1000000000000001 }",
                "overage 1000000000000001 is out of range",
            ),
            (
                "\"fifty\"",
                "a limit is a whole number (-1 for unlimited) or a table",
            ),
            (
                "[50, 100]",
                "a limit is a whole number (-1 for unlimited) or a table",
            ),
            (
                "true",
                "a limit is a whole number (-1 for unlimited) or a table",
            ),
        ] {
            let err = refused(&BUILT_IN.replace("export = 10", &format!("export = {value}")));
            assert!(
                err.starts_with("plans file /etc/quotad/plans.toml: plan FREE: type export: "),
                "{value}: {err}"
            );
            assert!(err.contains(fault), "{value}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn every_limit_table_within_range_is_read_as_written(
            limit in 0..=1_000i64,
            overage in proptest::option::of(0..=1_000i64),
            soft in proptest::option::of(proptest::bool::ANY),
        ) {
            let mut text = format!("limit = {limit}");
            if let Some(o) = overage {
                text += &format!(", overage = {o}");
            }
            if let Some(s) = soft {
                text += &format!(", soft = {s}");
            }
            let table: toml::Table = toml::from_str(&format!("x = {{ {text} }}")).unwrap();
            let read = LimitSpec::read(&table["x"], 1_000);
            match (overage, soft) {
                (Some(_), Some(_)) => proptest::prop_assert!(read.unwrap_err().contains("gives both overage and soft")),
                _ => {
                    let spec = read.unwrap();
                    let expected = match (overage, soft) {
                        (Some(o), _) if o > 0 => Overage::Cap(o as u64),
                        (_, Some(true)) => Overage::Soft,
                        _ => Overage::None,
                    };
                    proptest::prop_assert_eq!((spec.limit, spec.overage), (limit, expected));
                }
            }
        }

        #[test]
        fn an_overage_out_of_range_is_refused_naming_it(
            bad in proptest::prop_oneof![i64::MIN..0, 1_001..=i64::MAX],
        ) {
            let table: toml::Table =
                toml::from_str(&format!("x = {{ limit = 5, overage = {bad} }}")).unwrap();
            let err = LimitSpec::read(&table["x"], 1_000).unwrap_err();
            let expected = format!("overage {bad} is out of range");
            proptest::prop_assert!(err.contains(&expected), "{}", err);
        }
    }

    #[test]
    fn the_script_argument_reads_back_as_the_same_overage() {
        for o in [
            Overage::None,
            Overage::Cap(1),
            Overage::Cap(100),
            Overage::Soft,
        ] {
            assert_eq!(Overage::from_script(o.script_arg()), o);
        }
        assert_eq!(Overage::Cap(0).script_arg(), 0, "a cap of 0 is no overage");
        assert_eq!((Overage::None.cap(), Overage::Soft.cap()), (Some(0), None));
    }
}
