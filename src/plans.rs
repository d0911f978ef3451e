//! Plans and usage types: the TOML plans file, its validation, and the lookup the hot path uses.
//!
//! A plan gives every configured usage type a limit (`-1` = unlimited), and may let use go past it:
//! `{ limit = 50, overage = 100 }` allows 100 units of overage past the limit (150 in all), and
//! `{ limit = 50, soft = true }` never refuses (a soft limit). The file is parsed into [`Plans`]
//! once, validated whole, and swapped in atomically ([`PlanBook`]); a file that fails validation
//! never replaces the one in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::gate::{Gate, GateFile};
use crate::overage::LimitSpec;
pub use crate::overage::Overage;
use crate::period::PeriodKind;

/// The plans file quotad uses when `QUOTAD_PLANS` is not set.
pub const BUILT_IN: &str = r#"upgrade_url = "/settings/billing"
default_plan = "FREE"

[types]
ai_generation = { period = "month", label = "AI generations" }   # when Redis fails: fail = "open" (default)
export        = { period = "month", label = "Exports" }
kb_file       = { period = "lifetime", fail = "closed", label = "Knowledge-base files" }

[plans.FREE]
ai_generation = 50
export = 10
kb_file = 20

[plans.PRO]
ai_generation = -1
export = -1
kb_file = 1000

[plans.ENTERPRISE]
ai_generation = -1
export = -1
kb_file = -1
"#;

/// Hash field names the counter hash uses for itself (`store::counter::RESERVED`, whose test
/// checks this list refuses them); a usage type may not take them.
const RESERVED_TYPE_NAMES: [&str; 3] = ["v", "p", "pv"];
/// Largest amount of one call (and of one gate route).
pub const MAX_AMOUNT: u64 = 1_000_000;
/// Largest limit a plan may set: far above any real quota, far below Redis' i64 ceiling.
const MAX_LIMIT: i64 = 1_000_000_000_000_000;

/// What to answer for a type when Redis cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// Allow the action and mark the answer `degraded`.
    #[default]
    Open,
    /// Refuse with 503.
    Closed,
}

/// One configured usage type and each plan's limit for it.
#[derive(Debug, Clone)]
pub struct UsageType {
    /// The type's name, e.g. `ai_generation`.
    pub name: String,
    /// How its counters are windowed.
    pub period: PeriodKind,
    /// What to answer when Redis fails.
    pub fail: FailPolicy,
    /// How the usage page names it, e.g. "AI generations" (default: the name, spaced).
    pub label: String,
    /// Limit per plan name; `None` is unlimited.
    pub limits: BTreeMap<String, Option<u64>>,
    /// Overage per plan name (a plan without any is [`Overage::None`]; so is every unlimited one).
    pub overage: BTreeMap<String, Overage>,
    /// The limits flattened as the counting scripts take them: plan, limit, overage cap triples
    /// (limit `-1` = unlimited; cap `0` = none, `-1` = no cap: a soft limit; see
    /// [`Overage::script_arg`]). Built once so the hot path allocates nothing for it.
    pub script_limits: Vec<String>,
    /// Usage thresholds that record an event, in percent of the limit, ascending (`notify`).
    pub notify: Vec<u32>,
    /// `notify` as the consume script takes it: "80,100" ("" = none).
    pub script_notify: String,
}

/// A validated plans file.
#[derive(Debug, Clone)]
pub struct Plans {
    /// Where the user is sent to upgrade.
    pub upgrade_url: String,
    /// The plan of a user who has none stored.
    pub default_plan: String,
    /// Usage types by name.
    pub types: BTreeMap<String, UsageType>,
    /// Plan names, sorted.
    pub plan_names: Vec<String>,
    /// Where the plans came from: a path, or `built-in`.
    pub source: String,
    /// The gate's header names and route table (`[gate]`).
    pub gate: Gate,
}

/// Why a plans file was refused. The message names the file, the plan or type, and the fault.
#[derive(Debug, thiserror::Error)]
#[error("plans file {source_name}: {message}")]
pub struct PlansError {
    source_name: String,
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlansFile {
    upgrade_url: String,
    default_plan: String,
    types: BTreeMap<String, TypeFile>,
    /// Per plan, per type: a whole number (the limit) or a table (see `LimitSpec::read`).
    plans: BTreeMap<String, BTreeMap<String, toml::Value>>,
    #[serde(default)]
    gate: GateFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypeFile {
    period: PeriodKind,
    #[serde(default)]
    fail: FailPolicy,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    notify: Vec<i64>,
}

impl Plans {
    /// The built-in default.
    pub fn built_in() -> Plans {
        Plans::parse(BUILT_IN, "built-in").expect("the built-in plans file is valid")
    }

    /// Reads and validates the plans file at `path`.
    pub fn load(path: &Path) -> Result<Plans, PlansError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PlansError {
            source_name: name.clone(),
            message: format!("cannot be read: {e}"),
        })?;
        Plans::parse(&text, &name)
    }

    /// Parses and validates plans from TOML text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Plans, PlansError> {
        let fail = |message: String| PlansError {
            source_name: source_name.to_owned(),
            message,
        };
        let mut file: PlansFile = toml::from_str(text).map_err(|e| {
            fail(format!(
                "is not a valid plans file: {}",
                e.to_string().trim_end()
            ))
        })?;

        if file.types.is_empty() {
            return Err(fail("declares no usage types; add a [types] table".into()));
        }
        if file.plans.is_empty() {
            return Err(fail(
                "declares no plans; add at least one [plans.NAME] table".into(),
            ));
        }
        for name in file.types.keys() {
            if !valid_type_name(name) {
                return Err(fail(format!(
                    "type {name:?}: a type name is 1 to 63 lowercase letters, digits or '_', starting with a letter, and not one of {RESERVED_TYPE_NAMES:?}"
                )));
            }
        }
        let mut specs: BTreeMap<(String, String), LimitSpec> = BTreeMap::new();
        for (plan, limits) in &file.plans {
            if !valid_plan_name(plan) {
                return Err(fail(format!(
                    "plan {plan:?}: a plan name is 1 to 64 letters, digits, '_' or '-'"
                )));
            }
            for (ty, value) in limits {
                if !file.types.contains_key(ty) {
                    return Err(fail(format!(
                        "plan {plan}: type {ty} is not declared in [types]; declare it or remove the limit"
                    )));
                }
                let spec = LimitSpec::read(value, MAX_LIMIT)
                    .map_err(|fault| fail(format!("plan {plan}: type {ty}: {fault}")))?;
                specs.insert((plan.clone(), ty.clone()), spec);
            }
            for ty in file.types.keys() {
                if !limits.contains_key(ty) {
                    return Err(fail(format!(
                        "plan {plan}: gives no limit for type {ty}; add `{ty} = <limit>` (-1 for unlimited)"
                    )));
                }
            }
        }
        if !file.plans.contains_key(&file.default_plan) {
            return Err(fail(format!(
                "default_plan {:?} is not one of the plans ({})",
                file.default_plan,
                file.plans.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }

        for (name, spec) in &file.types {
            check_notify(name, &spec.notify).map_err(fail)?;
        }

        let gate = std::mem::take(&mut file.gate)
            .build(|t| file.types.contains_key(t), MAX_AMOUNT)
            .map_err(fail)?;
        let types = file
            .types
            .iter()
            .map(|(name, spec)| {
                let limit_of = |plan: &String| specs[&(plan.clone(), name.clone())];
                let limits: BTreeMap<String, Option<u64>> = file
                    .plans
                    .keys()
                    .map(|plan| (plan.clone(), u64::try_from(limit_of(plan).limit).ok()))
                    .collect();
                let overage: BTreeMap<String, Overage> = file
                    .plans
                    .keys()
                    .map(|plan| (plan.clone(), limit_of(plan).overage))
                    .collect();
                let script_limits = file
                    .plans
                    .keys()
                    .flat_map(|plan| {
                        let s = limit_of(plan);
                        [
                            plan.clone(),
                            s.limit.to_string(),
                            s.overage.script_arg().to_string(),
                        ]
                    })
                    .collect();
                let ty = UsageType {
                    name: name.clone(),
                    period: spec.period,
                    fail: spec.fail,
                    label: spec.label.clone().unwrap_or_else(|| default_label(name)),
                    limits,
                    overage,
                    script_limits,
                    notify: spec.notify.iter().map(|t| *t as u32).collect(),
                    script_notify: spec
                        .notify
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                };
                (name.clone(), ty)
            })
            .collect();
        Ok(Plans {
            upgrade_url: file.upgrade_url,
            default_plan: file.default_plan,
            types,
            plan_names: file.plans.keys().cloned().collect(),
            source: source_name.to_owned(),
            gate,
        })
    }

    /// The usage type named `name`, if configured.
    pub fn usage_type(&self, name: &str) -> Option<&UsageType> {
        self.types.get(name)
    }

    /// Whether `plan` is one of the configured plans.
    pub fn has_plan(&self, plan: &str) -> bool {
        self.plan_names
            .binary_search_by(|p| p.as_str().cmp(plan))
            .is_ok()
    }

    /// The plan in force for a stored plan name: the stored one if it is still configured,
    /// else the default. The counting scripts apply the same rule.
    pub fn effective_plan<'a>(&'a self, stored: Option<&'a str>) -> &'a str {
        match stored {
            Some(p) if self.has_plan(p) => p,
            _ => &self.default_plan,
        }
    }
}

impl UsageType {
    /// This type's limit under `plan` (`None` = unlimited). An unknown plan gets no limit entry,
    /// which callers prevent by resolving the plan through [`Plans::effective_plan`] first.
    pub fn limit(&self, plan: &str) -> Option<u64> {
        self.limits.get(plan).copied().flatten()
    }

    /// How far `plan` lets this type go past its limit.
    pub fn overage(&self, plan: &str) -> Overage {
        self.overage.get(plan).copied().unwrap_or_default()
    }
}

/// Most thresholds one type may notify at.
pub const MAX_THRESHOLDS: usize = 10;
/// Highest threshold, in percent of the limit (a plan with overage may pass 100 %).
pub const MAX_THRESHOLD: i64 = 1000;

/// A type's `notify` list: 1 to [`MAX_THRESHOLD`] percent each, strictly ascending, at most
/// [`MAX_THRESHOLDS`].
fn check_notify(ty: &str, notify: &[i64]) -> Result<(), String> {
    if notify.len() > MAX_THRESHOLDS {
        return Err(format!(
            "type {ty}: notify lists {} thresholds; at most {MAX_THRESHOLDS} are allowed",
            notify.len()
        ));
    }
    for t in notify {
        if !(1..=MAX_THRESHOLD).contains(t) {
            return Err(format!(
                "type {ty}: notify threshold {t} is out of range; use whole percents of the limit from 1 to {MAX_THRESHOLD}, e.g. notify = [80, 100]"
            ));
        }
    }
    if notify.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "type {ty}: notify = {notify:?} must list each threshold once, in ascending order, e.g. notify = [80, 100]"
        ));
    }
    Ok(())
}

/// `ai_generation` → `Ai generation`.
fn default_label(name: &str) -> String {
    let spaced = name.replace('_', " ");
    let mut chars = spaced.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn valid_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && !RESERVED_TYPE_NAMES.contains(&name)
}

fn valid_plan_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The plans in force, shared by every request and swapped whole on reload.
#[derive(Debug, Clone)]
pub struct PlanBook {
    current: Arc<RwLock<Arc<Plans>>>,
    // Shared, so cloning the book (once per request, with the app state) allocates nothing.
    path: Option<Arc<PathBuf>>,
}

impl PlanBook {
    /// Loads the plans from `path`, or the built-in default when `None`.
    pub fn open(path: Option<PathBuf>) -> Result<PlanBook, PlansError> {
        let plans = match &path {
            Some(p) => Plans::load(p)?,
            None => Plans::built_in(),
        };
        Ok(PlanBook {
            current: Arc::new(RwLock::new(Arc::new(plans))),
            path: path.map(Arc::new),
        })
    }

    /// The plans in force now.
    pub fn current(&self) -> Arc<Plans> {
        self.current.read().expect("plans lock poisoned").clone()
    }

    /// Re-reads the file. On any error the plans in force stay as they are and the error is
    /// returned for logging. With the built-in plans there is nothing to re-read.
    pub fn reload(&self) -> Result<Arc<Plans>, PlansError> {
        let Some(path) = &self.path else {
            return Ok(self.current());
        };
        let plans = Arc::new(Plans::load(path)?);
        *self.current.write().expect("plans lock poisoned") = plans.clone();
        Ok(plans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        Plans::parse(text, "/etc/quotad/plans.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_built_in_plans_match_the_design() {
        let plans = Plans::built_in();
        assert_eq!(plans.default_plan, "FREE");
        assert_eq!(plans.upgrade_url, "/settings/billing");
        let ai = plans.usage_type("ai_generation").unwrap();
        assert_eq!(ai.period, PeriodKind::Month);
        assert_eq!(ai.fail, FailPolicy::Open);
        assert_eq!(ai.limit("FREE"), Some(50));
        assert_eq!(ai.limit("PRO"), None);
        let kb = plans.usage_type("kb_file").unwrap();
        assert_eq!(kb.period, PeriodKind::Lifetime);
        assert_eq!(kb.fail, FailPolicy::Closed);
        assert_eq!(kb.limit("PRO"), Some(1000));
        assert_eq!(
            kb.script_limits,
            [
                "ENTERPRISE",
                "-1",
                "0",
                "FREE",
                "20",
                "0",
                "PRO",
                "1000",
                "0"
            ]
        );
        assert_eq!(kb.overage("FREE"), Overage::None);
    }

    #[test]
    fn a_plan_missing_a_type_is_refused_naming_file_plan_and_type() {
        let text = BUILT_IN.replace("export = 10\n", "");
        let err = refused(&text);
        assert!(err.contains("/etc/quotad/plans.toml"), "{err}");
        assert!(err.contains("plan FREE"), "{err}");
        assert!(err.contains("type export"), "{err}");
    }

    #[test]
    fn a_limit_below_minus_one_is_refused() {
        let err = refused(&BUILT_IN.replace("export = 10", "export = -5"));
        assert!(
            err.contains("plan FREE: type export: limit -5 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn an_undeclared_type_in_a_plan_is_refused() {
        let err = refused(&BUILT_IN.replace("export = 10", "export = 10\nvideo = 3"));
        assert!(
            err.contains("plan FREE: type video is not declared"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_default_plan_is_refused() {
        let err = refused(&BUILT_IN.replace("default_plan = \"FREE\"", "default_plan = \"BASIC\""));
        assert!(err.contains("default_plan \"BASIC\""), "{err}");
    }

    #[test]
    fn a_bad_period_or_fail_policy_or_unknown_key_is_refused() {
        assert!(
            refused(&BUILT_IN.replace("period = \"lifetime\"", "period = \"week\""))
                .contains("week")
        );
        assert!(
            refused(&BUILT_IN.replace("fail = \"closed\"", "fail = \"maybe\"")).contains("maybe")
        );
        assert!(refused(&format!("colour = 1\n{BUILT_IN}")).contains("colour"));
    }

    #[test]
    fn notify_thresholds_are_read_in_order_and_nonsense_is_refused() {
        let with = |notify: &str| {
            BUILT_IN.replace(
                "ai_generation = { period = \"month\", label = \"AI generations\" }",
                &format!("ai_generation = {{ period = \"month\", notify = {notify} }}"),
            )
        };
        let plans = Plans::parse(&with("[80, 100]"), "t").unwrap();
        let ai = plans.usage_type("ai_generation").unwrap();
        assert_eq!(ai.notify, [80, 100]);
        assert_eq!(ai.script_notify, "80,100");
        let export = plans.usage_type("export").unwrap();
        assert!(export.notify.is_empty() && export.script_notify.is_empty());
        assert_eq!(
            Plans::parse(&with("[50, 150, 1000]"), "t").unwrap().types["ai_generation"].notify,
            [50, 150, 1000]
        );
        for (bad, says) in [
            ("[0]", "out of range"),
            ("[-5]", "out of range"),
            ("[1001]", "out of range"),
            ("[100, 80]", "ascending"),
            ("[80, 80]", "once"),
            ("[1,2,3,4,5,6,7,8,9,10,11]", "at most 10"),
            ("[80.5]", "not a valid plans file"),
            ("\"80\"", "not a valid plans file"),
        ] {
            let err = refused(&with(bad));
            assert!(err.contains(says), "notify = {bad}: {err}");
            assert!(err.contains("/etc/quotad/plans.toml"), "{err}");
        }
    }

    #[test]
    fn reserved_and_malformed_type_names_are_refused() {
        for bad in ["v", "p", "pv", "Export", "9lives", "a-b"] {
            let text = BUILT_IN
                .replace("export ", &format!("\"{bad}\" "))
                .replace("export = ", &format!("\"{bad}\" = "));
            let err = refused(&text);
            assert!(err.contains(&format!("type {bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = refused("upgrade_url = ");
        assert!(
            err.starts_with("plans file /etc/quotad/plans.toml: is not a valid plans file"),
            "{err}"
        );
    }

    #[test]
    fn a_stored_plan_that_is_no_longer_configured_falls_back_to_the_default() {
        let plans = Plans::built_in();
        assert_eq!(plans.effective_plan(Some("PRO")), "PRO");
        assert_eq!(plans.effective_plan(Some("GOLD")), "FREE");
        assert_eq!(plans.effective_plan(None), "FREE");
    }

    mod props {
        //! Properties of the parser over generated plans files: every valid file is read exactly
        //! as written, every file broken in one way is refused naming what is wrong, and no text
        //! at all makes it panic.
        use super::super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        struct Spec {
            /// name, period, fail (`None` = left out), label (`None` = left out)
            types: Vec<(String, PeriodKind, Option<FailPolicy>, Option<String>)>,
            /// name, one limit per type (in `types` order)
            plans: Vec<(String, Vec<i64>)>,
            default_plan: usize,
        }

        impl Spec {
            fn render(&self) -> String {
                let mut out = format!(
                    "upgrade_url = \"/billing\"\ndefault_plan = \"{}\"\n\n[types]\n",
                    self.plans[self.default_plan].0
                );
                for (name, period, fail, label) in &self.types {
                    let period = match period {
                        PeriodKind::Month => "month",
                        PeriodKind::Lifetime => "lifetime",
                    };
                    out += &format!("\"{name}\" = {{ period = \"{period}\"");
                    match fail {
                        Some(FailPolicy::Open) => out += ", fail = \"open\"",
                        Some(FailPolicy::Closed) => out += ", fail = \"closed\"",
                        None => {}
                    }
                    if let Some(label) = label {
                        out += &format!(", label = \"{label}\"");
                    }
                    out += " }\n";
                }
                for (plan, limits) in &self.plans {
                    out += &format!("\n[plans.\"{plan}\"]\n");
                    for ((ty, ..), limit) in self.types.iter().zip(limits) {
                        out += &format!("\"{ty}\" = {limit}\n");
                    }
                }
                out
            }
        }

        fn type_name() -> impl Strategy<Value = String> {
            "[a-z][a-z0-9_]{0,12}"
                .prop_filter("reserved", |n| !RESERVED_TYPE_NAMES.contains(&n.as_str()))
        }

        fn limit() -> impl Strategy<Value = i64> {
            prop_oneof![Just(-1), 0i64..100, 0..=MAX_LIMIT]
        }

        fn spec() -> impl Strategy<Value = Spec> {
            let types = proptest::collection::btree_map(
                type_name(),
                (
                    prop_oneof![Just(PeriodKind::Month), Just(PeriodKind::Lifetime)],
                    proptest::option::of(prop_oneof![
                        Just(FailPolicy::Open),
                        Just(FailPolicy::Closed)
                    ]),
                    proptest::option::of("[A-Za-z0-9 ]{1,20}"),
                ),
                1..5,
            );
            let plan_names = proptest::collection::btree_set("[A-Za-z0-9_-]{1,12}", 1..5);
            (types, plan_names)
                .prop_flat_map(|(types, plans)| {
                    let n = types.len();
                    let limits = proptest::collection::vec(
                        proptest::collection::vec(limit(), n),
                        plans.len(),
                    );
                    let default = 0..plans.len();
                    (Just(types), Just(plans), limits, default)
                })
                .prop_map(|(types, plans, limits, default_plan)| Spec {
                    types: types
                        .into_iter()
                        .map(|(n, (p, f, l))| (n, p, f, l))
                        .collect(),
                    plans: plans.into_iter().zip(limits).collect(),
                    default_plan,
                })
        }

        fn refused(text: &str) -> String {
            match Plans::parse(text, "gen.toml") {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e.to_string(),
            }
        }

        proptest! {
            #[test]
            fn a_valid_file_is_read_exactly_as_written(spec in spec(), other in "[A-Za-z0-9_-]{1,12}") {
                let plans = Plans::parse(&spec.render(), "gen.toml").map_err(|e| TestCaseError::fail(e.to_string()))?;
                let default = &spec.plans[spec.default_plan].0;
                prop_assert_eq!(&plans.default_plan, default);
                let names: Vec<&String> = spec.plans.iter().map(|(n, _)| n).collect();
                prop_assert_eq!(plans.plan_names.iter().collect::<Vec<_>>(), names.clone());
                prop_assert_eq!(plans.types.len(), spec.types.len());
                for (i, (name, period, fail, label)) in spec.types.iter().enumerate() {
                    let ty = plans.usage_type(name).expect("declared type");
                    prop_assert_eq!(ty.period, *period);
                    prop_assert_eq!(ty.fail, fail.unwrap_or(FailPolicy::Open));
                    prop_assert_eq!(&ty.label, &label.clone().unwrap_or_else(|| default_label(name)));
                    let mut flat = Vec::new();
                    for (plan, limits) in &spec.plans {
                        let l = limits[i];
                        prop_assert_eq!(ty.limit(plan), u64::try_from(l).ok());
                        flat.push(plan.clone());
                        flat.push(l.to_string());
                        flat.push("0".to_owned());
                    }
                    prop_assert_eq!(&ty.script_limits, &flat);
                }
                for (plan, _) in &spec.plans {
                    prop_assert!(plans.has_plan(plan));
                    prop_assert_eq!(plans.effective_plan(Some(plan)), plan.as_str());
                }
                let expected = if names.contains(&&other) { other.as_str() } else { default.as_str() };
                prop_assert_eq!(plans.effective_plan(Some(&other)), expected);
                prop_assert_eq!(plans.effective_plan(None), default.as_str());
            }

            #[test]
            fn a_limit_out_of_range_is_refused_naming_plan_and_type(
                spec in spec(),
                bad in prop_oneof![i64::MIN..-1, (MAX_LIMIT + 1)..=i64::MAX],
                at in any::<prop::sample::Index>(),
            ) {
                let mut spec = spec;
                let plan = at.index(spec.plans.len());
                let ty = at.index(spec.types.len());
                spec.plans[plan].1[ty] = bad;
                let err = refused(&spec.render());
                prop_assert!(err.starts_with("plans file gen.toml: "), "{}", err);
                let expected = format!("plan {}: type {}: limit {bad} is out of range", spec.plans[plan].0, spec.types[ty].0);
                prop_assert!(err.contains(&expected), "{}", err);
            }

            #[test]
            fn a_missing_limit_is_refused_naming_plan_and_type(spec in spec(), at in any::<prop::sample::Index>()) {
                let text = spec.render();
                let plan = &spec.plans[at.index(spec.plans.len())].0;
                let ty = &spec.types[at.index(spec.types.len())].0;
                // Drop that one line from that plan's table.
                let table = format!("[plans.\"{plan}\"]\n");
                let start = text.find(&table).unwrap() + table.len();
                let line_at = start + text[start..].find(&format!("\"{ty}\" = ")).unwrap();
                let line_end = line_at + text[line_at..].find('\n').unwrap() + 1;
                let text = format!("{}{}", &text[..line_at], &text[line_end..]);
                let err = refused(&text);
                prop_assert!(err.contains(&format!("plan {plan}: gives no limit for type {ty}")), "{}", err);
            }

            #[test]
            fn names_outside_the_rules_are_refused(
                spec in spec(),
                bad_type in prop_oneof![
                    "[A-Z][a-z]{0,5}", "[0-9_][a-z]{0,5}", "[a-z]{1,3}-[a-z]{1,3}", "[a-z]{64,70}",
                    Just("v".to_owned()), Just("pv".to_owned()),
                ],
                bad_plan in prop_oneof!["[a-z]{1,3}[ .:/é][a-z]{1,3}", "[a-z]{65,70}"],
            ) {
                // A bad name never equals a generated (valid) one, so it replaces exactly one.
                let mut typed = spec.clone();
                typed.types[0].0 = bad_type.clone();
                let err = refused(&typed.render());
                prop_assert!(err.contains(&format!("type {bad_type:?}: a type name is")), "{}", err);
                let mut planned = spec;
                planned.plans[0].0 = bad_plan;
                let err = refused(&planned.render());
                prop_assert!(err.contains("a plan name is 1 to 64"), "{}", err);
            }

            #[test]
            fn an_undeclared_type_or_default_plan_is_refused(spec in spec(), extra in type_name(), other in "[A-Z]{1,8}") {
                if !spec.types.iter().any(|t| t.0 == extra) {
                    let text = spec.render().replacen(&format!("[plans.\"{}\"]\n", spec.plans[0].0), &format!("[plans.\"{}\"]\n{extra} = 1\n", spec.plans[0].0), 1);
                    let err = refused(&text);
                    prop_assert!(err.contains(&format!("type {extra} is not declared")), "{}", err);
                }
                if !spec.plans.iter().any(|p| p.0 == other) {
                    let text = spec.render().replacen(
                        &format!("default_plan = \"{}\"", spec.plans[spec.default_plan].0),
                        &format!("default_plan = \"{other}\""),
                        1,
                    );
                    let err = refused(&text);
                    prop_assert!(err.contains(&format!("default_plan \"{other}\" is not one of the plans")), "{}", err);
                }
            }

            #[test]
            fn no_text_makes_the_parser_panic(spec in spec(), cut in any::<prop::sample::Index>(), junk in "\\PC{0,40}") {
                let text = spec.render();
                // A prefix of a valid file (at a character boundary), then anything.
                let mut at = cut.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let _ = Plans::parse(&format!("{}{junk}", &text[..at]), "gen.toml");
                let _ = Plans::parse(&junk, "gen.toml");
            }
        }
    }
}
