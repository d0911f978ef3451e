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

/// A billing anchor: the day of the month and the UTC time of day at which a subscription's
/// monthly periods start (a user who subscribed on 31 January at 09:30 renews on the 31st at
/// 09:30). In a month without that day the period starts on the month's last day, at the same
/// time: an anchor on the 31st gives 28 (29) February and 30 April, and goes back to the 31st in
/// March. Periods under one anchor tile time: each ends where the next starts.
///
/// This is the period math of anniversary billing; the decisions still count in calendar months
/// ([`Period`]), which are the periods of an anchor on the 1st at midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Anchor {
    /// The day of the month, 1..=31.
    day: u32,
    /// The time of day, UTC.
    time: chrono::NaiveTime,
}

impl Anchor {
    /// The anchor of a subscription that started at `at`: its day of the month and time of day.
    pub fn of(at: DateTime<Utc>) -> Anchor {
        Anchor {
            day: at.day(),
            time: at.time(),
        }
    }

    /// The anchor's day of the month, 1..=31.
    pub fn day(self) -> u32 {
        self.day
    }

    /// The instant in `year`'s `month` (1..=12) at which a period starts: the anchor's day,
    /// clamped to the month's last day, at the anchor's time.
    pub fn start_in(self, year: i32, month: u32) -> DateTime<Utc> {
        let day = self.day.min(days_in_month(year, month));
        let date = NaiveDate::from_ymd_opt(year, month, day).expect("a day of the month");
        Utc.from_utc_datetime(&date.and_time(self.time))
    }

    /// The period `[start, end)` that contains `now`.
    pub fn period_containing(self, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let (year, month) = (now.year(), now.month());
        let here = self.start_in(year, month);
        if now >= here {
            let (ny, nm) = next_month(year, month);
            (here, self.start_in(ny, nm))
        } else {
            let (py, pm) = previous_month(year, month);
            (self.start_in(py, pm), here)
        }
    }
}

/// How many days `year`'s `month` (1..=12) has.
fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = next_month(year, month);
    (first_instant(ny, nm) - first_instant(year, month)).num_days() as u32
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn previous_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
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

    #[test]
    fn an_anchor_on_the_31st_clamps_to_february_and_april_and_comes_back_in_march() {
        let anchor = Anchor::of(at("2026-01-31T09:30:00Z"));
        let starts: Vec<DateTime<Utc>> = [(2027, 1), (2027, 2), (2027, 3), (2027, 4), (2027, 5)]
            .iter()
            .map(|(y, m)| anchor.start_in(*y, *m))
            .collect();
        assert_eq!(
            starts,
            [
                at("2027-01-31T09:30:00Z"),
                at("2027-02-28T09:30:00Z"),
                at("2027-03-31T09:30:00Z"),
                at("2027-04-30T09:30:00Z"),
                at("2027-05-31T09:30:00Z"),
            ]
        );
        // A leap year's February has the 29th.
        assert_eq!(anchor.start_in(2028, 2), at("2028-02-29T09:30:00Z"));
        assert_eq!(
            anchor.period_containing(at("2028-03-01T00:00:00Z")),
            (at("2028-02-29T09:30:00Z"), at("2028-03-31T09:30:00Z"))
        );
        // Before the anchor's time on its day, the period is still the one before.
        assert_eq!(
            anchor.period_containing(at("2027-03-31T09:29:59.999Z")),
            (at("2027-02-28T09:30:00Z"), at("2027-03-31T09:30:00Z"))
        );
        assert_eq!(
            anchor.period_containing(at("2027-03-31T09:30:00Z")),
            (at("2027-03-31T09:30:00Z"), at("2027-04-30T09:30:00Z"))
        );
    }

    #[test]
    fn an_anchor_on_the_first_at_midnight_gives_the_calendar_months() {
        let anchor = Anchor::of(at("2026-01-01T00:00:00Z"));
        for t in [
            "2026-11-30T23:59:59.999Z",
            "2026-12-01T00:00:00Z",
            "2028-02-29T12:00:00Z",
        ] {
            let p = month_at(t);
            assert_eq!(
                anchor.period_containing(at(t)),
                (p.start(), p.end().unwrap())
            );
        }
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
            fn every_instant_lies_in_exactly_one_anchored_period_and_periods_tile_time(
                a in instant(),
                t in instant(),
            ) {
                let anchor = Anchor::of(a);
                let (start, end) = anchor.period_containing(t);
                prop_assert!(start <= t && t < end, "{t} outside [{start}, {end})");
                // Contiguous: the next period starts where this one ends, the one before ends
                // where it starts; so no other period contains t.
                prop_assert_eq!(anchor.period_containing(end).0, end);
                prop_assert_eq!(
                    anchor.period_containing(start - chrono::Duration::milliseconds(1)).1,
                    start
                );
                prop_assert_eq!(anchor.period_containing(start), (start, end));
                prop_assert_eq!(
                    anchor.period_containing(end - chrono::Duration::milliseconds(1)),
                    (start, end)
                );
                // Clamped: each start is the anchor's day, or the month's last day when the month
                // is shorter, at the anchor's time.
                for s in [start, end] {
                    prop_assert_eq!(s.time(), a.time());
                    prop_assert_eq!(s.day(), a.day().min(days_in_month(s.year(), s.month())));
                }
                // One period a month: 28 to 31 days, with the start in consecutive months.
                prop_assert!((28..=31).contains(&(end - start).num_days()), "{start} {end}");
                prop_assert_eq!(next_month(start.year(), start.month()), (end.year(), end.month()));
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
