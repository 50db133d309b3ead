//! Workloop specs: a worker's capacity split into slot groups, e.g. `fast_lane:1 manual>*:4`.

use std::fmt;

use crate::chain::ClaimChain;
use crate::error::InvalidInput;

/// One slot group: a claim chain and how many runs it may hold at once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workloop {
    /// Which lanes it claims from, in which order.
    pub chain: ClaimChain,
    /// How many runs it may hold at once (≥ 1).
    pub slots: u32,
}

/// The most slots one workloop may have.
pub const MAX_SLOTS: u32 = 10_000;

/// A parsed workloop spec: one or more workloops separated by whitespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloopSpec(pub Vec<Workloop>);

impl WorkloopSpec {
    /// Parses `chain:count chain:count …`; errors name the `workloops` field.
    ///
    /// Tokens are separated by any whitespace. Each token splits at its last `:` into a claim
    /// chain ([`ClaimChain::parse`]) and a count of 1 to [`MAX_SLOTS`] written in decimal
    /// digits. Every error reason quotes the offending token.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let loops = text
            .split_whitespace()
            .map(parse_token)
            .collect::<Result<Vec<_>, _>>()?;
        if loops.is_empty() {
            return Err(InvalidInput::new(
                FIELD,
                "must not be empty (expected e.g. `manual>*:4`)",
            ));
        }
        Ok(WorkloopSpec(loops))
    }

    /// One workloop on the default chain with `slots` slots.
    pub fn single(slots: u32) -> Self {
        WorkloopSpec(vec![Workloop {
            chain: ClaimChain::default_chain(),
            slots,
        }])
    }

    /// Total slots across workloops (saturating at `u32::MAX`).
    pub fn total_slots(&self) -> u32 {
        self.0.iter().fold(0u32, |n, w| n.saturating_add(w.slots))
    }
}

/// The field every workloop error names.
const FIELD: &str = "workloops";

fn parse_token(token: &str) -> Result<Workloop, InvalidInput> {
    let Some((chain, count)) = token.rsplit_once(':') else {
        return Err(InvalidInput::new(
            FIELD,
            format!("missing :count in token {token:?}"),
        ));
    };
    let chain = ClaimChain::parse(FIELD, chain)
        .map_err(|e| InvalidInput::new(FIELD, format!("in token {token:?}: {}", e.reason)))?;
    let slots = parse_count(count)
        .map_err(|reason| InvalidInput::new(FIELD, format!("in token {token:?}: {reason}")))?;
    Ok(Workloop { chain, slots })
}

fn parse_count(count: &str) -> Result<u32, String> {
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("count must be an integer, got {count:?}"));
    }
    // All digits: the only parse failure left is overflow, which is above the bound anyway.
    let n = count.parse::<u32>().unwrap_or(u32::MAX);
    if n < 1 {
        return Err("count must be at least 1".to_string());
    }
    if n > MAX_SLOTS {
        return Err(format!("count must be at most {MAX_SLOTS}, got {count}"));
    }
    Ok(n)
}

/// `chain:slots`, e.g. `manual>*:4`.
impl fmt::Display for Workloop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.chain, self.slots)
    }
}

/// The canonical form: workloops joined by one space; it parses back to the same spec.
impl fmt::Display for WorkloopSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for w in &self.0 {
            write!(f, "{sep}{w}")?;
            sep = " ";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::claim_chain;
    use proptest::prelude::*;

    fn chain(text: &str) -> ClaimChain {
        ClaimChain::parse("chain", text).expect("valid chain")
    }

    fn wl(text: &str, slots: u32) -> Workloop {
        Workloop {
            chain: chain(text),
            slots,
        }
    }

    #[test]
    fn accepted_forms_parse_and_print_canonically() {
        let cases = [
            (
                "fast_lane:1 manual>*:4",
                vec![wl("fast_lane", 1), wl("manual>*", 4)],
                "fast_lane:1 manual>*:4",
            ),
            ("*:1", vec![wl("*", 1)], "*:1"),
            ("a>b:10000", vec![wl("a>b", 10_000)], "a>b:10000"),
            ("  manual>*:4\t", vec![wl("manual>*", 4)], "manual>*:4"),
            (
                "a:1\n\tb:2   c>*:3",
                vec![wl("a", 1), wl("b", 2), wl("c>*", 3)],
                "a:1 b:2 c>*:3",
            ),
            ("a:007", vec![wl("a", 7)], "a:7"),
            ("a:1 a:2", vec![wl("a", 1), wl("a", 2)], "a:1 a:2"),
        ];
        for (text, want, canonical) in cases {
            let got = WorkloopSpec::parse(text).expect(text);
            assert_eq!(got, WorkloopSpec(want), "{text:?}");
            assert_eq!(got.to_string(), canonical, "{text:?}");
        }
    }

    #[test]
    fn single_and_total_slots() {
        let single = WorkloopSpec::single(3);
        assert_eq!(single.to_string(), "manual>*:3");
        assert_eq!(single.total_slots(), 3);
        let spec = WorkloopSpec::parse("fast_lane:1 manual>*:4").expect("valid");
        assert_eq!(spec.total_slots(), 5);
        let huge = WorkloopSpec(vec![wl("a", u32::MAX), wl("b", 1)]);
        assert_eq!(huge.total_slots(), u32::MAX);
    }

    #[test]
    fn refused_forms_name_the_field_the_token_and_the_reason() {
        let cases: [(&str, &str); 21] = [
            ("", "must not be empty"),
            (" \t\n ", "must not be empty"),
            ("manual>*", "missing :count in token \"manual>*\""),
            ("a:1 b", "missing :count in token \"b\""),
            ("a:", "in token \"a:\": count must be an integer"),
            ("a:x", "in token \"a:x\": count must be an integer"),
            ("a:-1", "in token \"a:-1\": count must be an integer"),
            ("a:+1", "in token \"a:+1\": count must be an integer"),
            ("a:1.5", "in token \"a:1.5\": count must be an integer"),
            ("a:1:2", "in token \"a:1:2\": lane \"a:1\" at position 1"),
            ("a:0", "in token \"a:0\": count must be at least 1"),
            ("a:000", "in token \"a:000\": count must be at least 1"),
            (
                "a:10001",
                "in token \"a:10001\": count must be at most 10000",
            ),
            ("a:99999999999999999999", "count must be at most 10000"),
            (":4", "in token \":4\": claim chain must not be empty"),
            ("a>:4", "in token \"a>:4\": empty lane name at position 2"),
            ("*>a:1", "in token \"*>a:1\": `*` must be last"),
            ("*>*:1", "in token \"*>*:1\": `*` appears twice"),
            ("a>a:1", "in token \"a>a:1\": duplicate lane name"),
            ("a-b:1", "in token \"a-b:1\": lane \"a-b\" at position 1"),
            ("ok:1 a > b:2", "missing :count in token \"a\""),
        ];
        for (text, fragment) in cases {
            let err = WorkloopSpec::parse(text).expect_err(text);
            assert_eq!(err.field, "workloops", "{text:?}");
            assert!(
                err.reason.contains(fragment),
                "{text:?}: {:?} lacks {fragment:?}",
                err.reason
            );
            assert!(!err.reason.ends_with('.'), "{text:?}");
        }
    }

    fn workloop_spec() -> impl Strategy<Value = WorkloopSpec> {
        prop::collection::vec((claim_chain(), 1..=MAX_SLOTS), 1..5).prop_map(|loops| {
            WorkloopSpec(
                loops
                    .into_iter()
                    .map(|(chain, slots)| Workloop { chain, slots })
                    .collect(),
            )
        })
    }

    proptest! {
        #[test]
        fn display_round_trips_through_parse(spec in workloop_spec()) {
            let text = spec.to_string();
            prop_assert_eq!(WorkloopSpec::parse(&text), Ok(spec.clone()));
            let spaced = text.replace(' ', " \t\n ");
            prop_assert_eq!(WorkloopSpec::parse(&spaced), Ok(spec));
        }

        #[test]
        fn out_of_range_counts_are_refused(
            chain in claim_chain(),
            count in prop_oneof![Just(0u64), (u64::from(MAX_SLOTS) + 1)..],
        ) {
            let text = format!("{chain}:{count}");
            let err = WorkloopSpec::parse(&text).expect_err("count out of range");
            prop_assert_eq!(err.field, "workloops");
            prop_assert!(err.reason.contains(&format!("{text:?}")), "{:?}", err.reason);
        }
    }
}
