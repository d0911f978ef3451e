//! Billing periods: pure calendar math over an injected `now`, no I/O.
//!
//! A `month` period is the UTC calendar month `[start, end)`: `end` is the first instant of the next
//! month, so the last second of November (23:59:59 on the 30th) still belongs to November and
//! 00:00:00 on 1 December starts a fresh counter. A `lifetime` period never resets.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// How a usage type's counters are windowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PeriodKind {
    /// The UTC calendar month.
    Month,
    /// Never resets: a stock, such as files stored.
    Lifetime,
}

/// One concrete window a counter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A UTC calendar month; `month` is 1..=12.
    Month { year: i32, month: u32 },
    /// The single, never-ending period of lifetime counters.
    Lifetime,
}

/// The fixed `period_start` that lifetime rows carry in Postgres.
pub const LIFETIME_START: DateTime<Utc> = DateTime::UNIX_EPOCH;

impl Period {
    /// The period of `kind` that contains `now`.
    pub fn current(kind: PeriodKind, now: DateTime<Utc>) -> Period {
        match kind {
            PeriodKind::Month => Period::Month {
                year: now.year(),
                month: now.month(),
            },
            PeriodKind::Lifetime => Period::Lifetime,
        }
    }

    /// First instant of the period (inclusive). Lifetime periods start at the Unix epoch.
    pub fn start(self) -> DateTime<Utc> {
        match self {
            Period::Month { year, month } => first_instant(year, month),
            Period::Lifetime => LIFETIME_START,
        }
    }

    /// The month before; `None` for lifetime.
    pub fn previous(self) -> Option<Period> {
        match self {
            Period::Month { year, month: 1 } => Some(Period::Month {
                year: year - 1,
                month: 12,
            }),
            Period::Month { year, month } => Some(Period::Month {
                year,
                month: month - 1,
            }),
            Period::Lifetime => None,
        }
    }

    /// First instant after the period (exclusive end); `None` for lifetime.
    pub fn end(self) -> Option<DateTime<Utc>> {
        match self {
            Period::Month { year, month } => {
                let (y, m) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                Some(first_instant(y, m))
            }
            Period::Lifetime => None,
        }
    }

    /// The short name used in Redis keys and dirty-set members: `2026-11`, or `life`.
    pub fn id(self) -> String {
        match self {
            Period::Month { year, month } => format!("{year:04}-{month:02}"),
            Period::Lifetime => "life".to_owned(),
        }
    }

    /// Parses what [`Period::id`] writes.
    pub fn parse_id(s: &str) -> Option<Period> {
        if s == "life" {
            return Some(Period::Lifetime);
        }
        let (y, m) = s.split_once('-')?;
        // Exactly what `id` writes: four and two ASCII digits. (`str::parse` alone would also take
        // a sign, so `+202-11` would name the year 202 under an id that is not its own.)
        let digits =
            |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(y, 4) || !digits(m, 2) {
            return None;
        }
        let year: i32 = y.parse().ok()?;
        let month: u32 = m.parse().ok()?;
        (1..=12)
            .contains(&month)
            .then_some(Period::Month { year, month })
    }

    /// Whole seconds from `now` until the period resets (at least 1 while it is current);
    /// `None` for lifetime.
    pub fn seconds_until_reset(self, now: DateTime<Utc>) -> Option<u64> {
        let end = self.end()?;
        let millis = (end - now).num_milliseconds().max(0) as u64;
        // Round up: "retry in 0 s" one millisecond before the reset would invite a refused retry.
        Some(millis.div_ceil(1000).max(1))
    }

    /// Unix time at which Redis may drop this period's counters: the period's end plus `grace`, so
    /// a finished month stays readable long enough to flush and reconcile. `None` for lifetime.
    pub fn expire_at(self, grace: chrono::Duration) -> Option<i64> {
        self.end().map(|end| (end + grace).timestamp())
    }
}

fn first_instant(year: i32, month: u32) -> DateTime<Utc> {
    let date = NaiveDate::from_ymd_opt(year, month, 1).expect("month is 1..=12");
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_month_before_january_is_last_december() {
        let jan = Period::Month {
            year: 2027,
            month: 1,
        };
        assert_eq!(
            jan.previous(),
            Some(Period::Month {
                year: 2026,
                month: 12
            })
        );
        assert_eq!(
            Period::Month {
                year: 2026,
                month: 11
            }
            .previous(),
            Some(Period::Month {
                year: 2026,
                month: 10
            })
        );
        assert_eq!(Period::Lifetime.previous(), None);
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn month_at(s: &str) -> Period {
        Period::current(PeriodKind::Month, at(s))
    }

    #[test]
    fn the_last_second_of_november_is_still_november() {
        let p = month_at("2026-11-30T23:59:59Z");
        assert_eq!(p.id(), "2026-11");
        assert_eq!(p.start(), at("2026-11-01T00:00:00Z"));
        assert_eq!(p.end(), Some(at("2026-12-01T00:00:00Z")));
        assert_eq!(p.seconds_until_reset(at("2026-11-30T23:59:59Z")), Some(1));
    }

    #[test]
    fn the_last_millisecond_of_a_month_rounds_up_to_one_second() {
        let p = month_at("2026-11-30T23:59:59.999Z");
        assert_eq!(p.id(), "2026-11");
        assert_eq!(
            p.seconds_until_reset(at("2026-11-30T23:59:59.999Z")),
            Some(1)
        );
    }

    #[test]
    fn midnight_on_the_first_starts_the_next_month() {
        let p = month_at("2026-12-01T00:00:00Z");
        assert_eq!(p.id(), "2026-12");
        assert_eq!(p.start(), at("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn december_ends_on_the_first_of_january_of_the_next_year() {
        let p = month_at("2026-12-31T23:59:59Z");
        assert_eq!(p.end(), Some(at("2027-01-01T00:00:00Z")));
        assert_eq!(month_at("2027-01-01T00:00:00Z").id(), "2027-01");
    }

    #[test]
    fn february_of_a_leap_year_has_29_days() {
        let p = month_at("2028-02-29T12:00:00Z");
        assert_eq!(p.id(), "2028-02");
        assert_eq!(p.end(), Some(at("2028-03-01T00:00:00Z")));
        assert_eq!(p.end().unwrap() - p.start(), chrono::Duration::days(29));
    }

    #[test]
    fn february_of_a_common_year_has_28_days() {
        let p = month_at("2026-02-10T00:00:00Z");
        assert_eq!(p.end().unwrap() - p.start(), chrono::Duration::days(28));
        // 2100 is divisible by 4 but not a leap year.
        let p = month_at("2100-02-10T00:00:00Z");
        assert_eq!(p.end().unwrap() - p.start(), chrono::Duration::days(28));
    }

    #[test]
    fn months_of_30_and_31_days_end_on_the_right_day() {
        assert_eq!(
            month_at("2026-04-30T23:59:59Z").end(),
            Some(at("2026-05-01T00:00:00Z"))
        );
        assert_eq!(
            month_at("2026-01-31T23:59:59Z").end(),
            Some(at("2026-02-01T00:00:00Z"))
        );
    }

    #[test]
    fn time_zones_do_not_move_the_boundary() {
        // 1 December 01:00 in UTC+02:00 is still 30 November 23:00 UTC.
        let local: DateTime<Utc> = "2026-12-01T01:00:00+02:00"
            .parse::<DateTime<chrono::FixedOffset>>()
            .unwrap()
            .into();
        assert_eq!(month_at(&local.to_rfc3339()).id(), "2026-11");
    }

    #[test]
    fn lifetime_never_resets() {
        let p = Period::current(PeriodKind::Lifetime, at("2026-11-30T23:59:59Z"));
        assert_eq!(p, Period::Lifetime);
        assert_eq!(p.end(), None);
        assert_eq!(p.seconds_until_reset(at("2026-11-30T23:59:59Z")), None);
        assert_eq!(p.expire_at(chrono::Duration::days(35)), None);
        assert_eq!(p.start(), LIFETIME_START);
    }

    #[test]
    fn ids_round_trip_and_garbage_is_refused() {
        for p in [
            Period::Lifetime,
            Period::Month {
                year: 2026,
                month: 1,
            },
            Period::Month {
                year: 2026,
                month: 12,
            },
        ] {
            assert_eq!(Period::parse_id(&p.id()), Some(p));
        }
        for bad in [
            "", "2026", "2026-13", "2026-00", "26-11", "2026-1", "life2", "+202-11", "2026-+1",
            "-026-11", " 026-11", "2026-1 ",
        ] {
            assert_eq!(Period::parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn counters_expire_a_grace_period_after_the_month_ends() {
        let p = month_at("2026-11-15T00:00:00Z");
        let expected = (at("2026-12-01T00:00:00Z") + chrono::Duration::days(35)).timestamp();
        assert_eq!(p.expire_at(chrono::Duration::days(35)), Some(expected));
    }

    mod props {
        //! Properties of the period math over any instant from 1970 to 2400, to the millisecond.
        use super::super::*;
        use proptest::prelude::*;

        /// 2400-01-01T00:00:00Z in ms.
        const UNTIL_MS: i64 = 13_569_465_600_000;

        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            (0..UNTIL_MS).prop_map(|ms| DateTime::from_timestamp_millis(ms).expect("in range"))
        }

        fn month_of(t: DateTime<Utc>) -> Period {
            Period::current(PeriodKind::Month, t)
        }

        proptest! {
            #[test]
            fn an_instant_lies_in_its_month_and_the_month_is_a_calendar_month(t in instant()) {
                let p = month_of(t);
                let (start, end) = (p.start(), p.end().unwrap());
                prop_assert!(start <= t && t < end, "{t} outside [{start}, {end})");
                prop_assert_eq!((start.day(), start.time()), (1, chrono::NaiveTime::MIN));
                prop_assert_eq!((end.day(), end.time()), (1, chrono::NaiveTime::MIN));
                prop_assert!((28..=31).contains(&(end - start).num_days()));
                prop_assert_eq!((end - start).num_seconds() % 86_400, 0);
                // Both ends: the first instant is in the month, the last millisecond too, the end not.
                prop_assert_eq!(month_of(start), p);
                prop_assert_eq!(month_of(end - chrono::Duration::milliseconds(1)), p);
                prop_assert_ne!(month_of(end), p);
            }

            #[test]
            fn consecutive_months_tile_time_without_gap_or_overlap(t in instant()) {
                let p = month_of(t);
                let next = month_of(p.end().unwrap());
                prop_assert_eq!(next.start(), p.end().unwrap());
                prop_assert_eq!(next.previous(), Some(p));
                let before = p.previous().unwrap();
                prop_assert_eq!(before.end(), Some(p.start()));
                prop_assert_eq!(month_of(p.start() - chrono::Duration::milliseconds(1)), before);
            }

            #[test]
            fn seconds_until_reset_is_the_wait_rounded_up_and_never_zero(t in instant()) {
                let p = month_of(t);
                let end = p.end().unwrap();
                let wait = p.seconds_until_reset(t).unwrap() as i64;
                prop_assert!(wait >= 1);
                // Waiting that long reaches the reset; a second less does not (unless 1 s is the floor).
                prop_assert!(t + chrono::Duration::seconds(wait) >= end);
                if wait > 1 {
                    prop_assert!(t + chrono::Duration::seconds(wait - 1) < end);
                }
                prop_assert!(wait <= 31 * 86_400);
            }

            #[test]
            fn ids_round_trip_and_sort_in_time_order(a in instant(), b in instant()) {
                let (pa, pb) = (month_of(a), month_of(b));
                prop_assert_eq!(Period::parse_id(&pa.id()), Some(pa));
                prop_assert_eq!(pa.id().cmp(&pb.id()), pa.start().cmp(&pb.start()));
                prop_assert_eq!(pa == pb, pa.id() == pb.id());
            }

            #[test]
            fn parse_id_takes_only_what_id_writes(
                s in prop_oneof![
                    "[0-9+ -]{4}-[0-9+ -]{2}",
                    "[0-9]{1,5}-[0-9]{1,3}",
                    "[+-]?[0-9]{3,4}-[+-]?[0-9]{1,2}",
                    "\\PC{0,12}",
                    Just("life".to_owned()),
                ]
            ) {
                if let Some(p) = Period::parse_id(&s) {
                    prop_assert_eq!(p.id(), s);
                }
            }

            #[test]
            fn counters_expire_the_grace_after_the_month_ends(t in instant(), days in 0i64..400) {
                let p = month_of(t);
                let grace = chrono::Duration::days(days);
                prop_assert_eq!(p.expire_at(grace), Some((p.end().unwrap() + grace).timestamp()));
                prop_assert_eq!(Period::Lifetime.expire_at(grace), None);
            }
        }
    }
}
