//! Claim chains: the ordered lane preferences of a workload (SPEC §3, seed 001).
//!
//! `fast_lane` or `a>b` is **filter mode** (only the named lanes, in that order); `manual>*` is
//! **preference mode** (the named lanes first, then every other lane, including lanes added
//! later). Names match `[A-Za-z0-9_]+`; `*` appears at most once and only last.

use std::fmt;

use crate::error::InvalidInput;
use crate::lane::LaneName;

/// A parsed claim chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClaimChain {
    /// Only these lanes, in this order.
    Filter(Vec<LaneName>),
    /// These lanes first, in this order, then every other lane (`*`).
    Preference(Vec<LaneName>),
}

impl ClaimChain {
    /// Parses `a>b>*`; errors name `field`.
    ///
    /// The whole text is trimmed; the parts between `>` are not (`a > b` is refused). Each part
    /// is a lane name ([`LaneName::parse`]) or `*`, which may appear once and only last. A lane
    /// may not be named twice. `*` alone is preference mode with no named lanes. Positions in
    /// error reasons are 1-based.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, InvalidInput> {
        let text = text.trim();
        if text.is_empty() {
            return Err(InvalidInput::new(field, "claim chain must not be empty"));
        }
        let parts: Vec<&str> = text.split('>').collect();
        let stars = parts.iter().filter(|p| **p == "*").count();
        let mut lanes: Vec<LaneName> = Vec::with_capacity(parts.len());
        let mut wildcard = false;
        for (i, part) in parts.iter().enumerate() {
            let position = i + 1;
            if part.is_empty() {
                return Err(InvalidInput::new(
                    field,
                    format!("empty lane name at position {position} of {text:?}"),
                ));
            }
            if *part == "*" {
                if stars > 1 {
                    return Err(InvalidInput::new(
                        field,
                        format!("`*` appears twice in {text:?}"),
                    ));
                }
                if position != parts.len() {
                    return Err(InvalidInput::new(
                        field,
                        format!("`*` must be last in {text:?}, found at position {position}"),
                    ));
                }
                wildcard = true;
                continue;
            }
            let lane = LaneName::parse(field, part).map_err(|e| {
                InvalidInput::new(
                    field,
                    format!("lane {part:?} at position {position}: {}", e.reason),
                )
            })?;
            if lanes.contains(&lane) {
                return Err(InvalidInput::new(
                    field,
                    format!("duplicate lane name {part:?} at position {position}"),
                ));
            }
            lanes.push(lane);
        }
        Ok(if wildcard {
            ClaimChain::Preference(lanes)
        } else {
            ClaimChain::Filter(lanes)
        })
    }

    /// The default chain, `manual>*`.
    pub fn default_chain() -> Self {
        ClaimChain::Preference(vec![LaneName::manual()])
    }

    /// The named lanes, in order.
    pub fn named(&self) -> &[LaneName] {
        match self {
            ClaimChain::Filter(l) | ClaimChain::Preference(l) => l,
        }
    }

    /// Whether the chain ends in `*`.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, ClaimChain::Preference(_))
    }

    /// Whether a claim with this chain may take runs from `lane`.
    pub fn covers(&self, lane: &LaneName) -> bool {
        self.is_wildcard() || self.named().contains(lane)
    }
}

/// The canonical form: lanes joined by `>`, then `>*` in preference mode (`*` alone when no lane
/// is named). It parses back to the same chain; an empty `Filter`, which [`ClaimChain::parse`]
/// never yields, prints as the empty string.
impl fmt::Display for ClaimChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for lane in self.named() {
            write!(f, "{sep}{lane}")?;
            sep = ">";
        }
        if self.is_wildcard() {
            write!(f, "{sep}*")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lanes(names: &[&str]) -> Vec<LaneName> {
        names
            .iter()
            .map(|n| LaneName::new(n).expect("valid lane"))
            .collect()
    }

    #[test]
    fn accepted_forms_parse_and_print_canonically() {
        let cases: [(&str, ClaimChain, &str); 9] = [
            (
                "fast_lane",
                ClaimChain::Filter(lanes(&["fast_lane"])),
                "fast_lane",
            ),
            ("a>b", ClaimChain::Filter(lanes(&["a", "b"])), "a>b"),
            (
                "manual>*",
                ClaimChain::Preference(lanes(&["manual"])),
                "manual>*",
            ),
            ("*", ClaimChain::Preference(vec![]), "*"),
            (
                "  a>B_9>*\t\n",
                ClaimChain::Preference(lanes(&["a", "B_9"])),
                "a>B_9>*",
            ),
            ("A>a", ClaimChain::Filter(lanes(&["A", "a"])), "A>a"),
            ("_", ClaimChain::Filter(lanes(&["_"])), "_"),
            (
                &"x".repeat(64),
                ClaimChain::Filter(lanes(&[&"x".repeat(64)])),
                &"x".repeat(64),
            ),
            (
                "0>1>2>3>*",
                ClaimChain::Preference(lanes(&["0", "1", "2", "3"])),
                "0>1>2>3>*",
            ),
        ];
        for (text, want, canonical) in cases {
            let got = ClaimChain::parse("chain", text).expect(text);
            assert_eq!(got, want, "{text:?}");
            assert_eq!(got.to_string(), canonical, "{text:?}");
        }
    }

    #[test]
    fn default_chain_is_manual_then_everything() {
        let chain = ClaimChain::default_chain();
        assert_eq!(chain.to_string(), "manual>*");
        assert_eq!(ClaimChain::parse("chain", "manual>*"), Ok(chain));
    }

    #[test]
    fn modes_decide_coverage() {
        let filter = ClaimChain::parse("chain", "a>b").expect("valid");
        assert!(!filter.is_wildcard());
        assert!(filter.covers(&LaneName::new("b").expect("valid")));
        assert!(!filter.covers(&LaneName::new("c").expect("valid")));
        let pref = ClaimChain::parse("chain", "a>*").expect("valid");
        assert!(pref.is_wildcard());
        assert_eq!(pref.named(), lanes(&["a"]).as_slice());
        assert!(pref.covers(&LaneName::new("later_added").expect("valid")));
    }

    #[test]
    fn refused_forms_name_the_field_and_the_reason() {
        let long = format!("a>{}", "x".repeat(65));
        let cases: [(&str, &str); 19] = [
            ("", "must not be empty"),
            ("   \t", "must not be empty"),
            (">", "empty lane name at position 1"),
            ("a>", "empty lane name at position 2"),
            (">a", "empty lane name at position 1"),
            ("a>>b", "empty lane name at position 2"),
            ("a>>*", "empty lane name at position 2"),
            ("*>a", "`*` must be last"),
            ("a>*>b", "`*` must be last"),
            ("*>*", "`*` appears twice"),
            ("a>*>*", "`*` appears twice"),
            ("*>a>*", "`*` appears twice"),
            ("a>a", "duplicate lane name \"a\" at position 2"),
            ("a>b>a>*", "duplicate lane name \"a\" at position 3"),
            (
                "a-b",
                "lane \"a-b\" at position 1: character '-' is not allowed",
            ),
            (
                "a > b",
                "lane \"a \" at position 1: character ' ' is not allowed",
            ),
            ("a>b*", "lane \"b*\" at position 2"),
            ("a>**", "lane \"**\" at position 2"),
            (&long, "at position 2: must be at most 64 bytes"),
        ];
        for (text, fragment) in cases {
            let err = ClaimChain::parse("my_field", text).expect_err(text);
            assert_eq!(err.field, "my_field", "{text:?}");
            assert!(
                err.reason.contains(fragment),
                "{text:?}: {:?} lacks {fragment:?}",
                err.reason
            );
            assert!(!err.reason.starts_with(char::is_uppercase), "{text:?}");
            assert!(!err.reason.ends_with('.'), "{text:?}");
        }
    }

    /// A valid lane name: 1 to 64 characters of `[A-Za-z0-9_]`.
    pub(crate) fn lane_name() -> impl Strategy<Value = LaneName> {
        let alphabet: Vec<char> = ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain(std::iter::once('_'))
            .collect();
        prop_oneof![
            // Mostly short names, so that duplicates and built-in names come up.
            3 => prop::sample::select(vec!["a", "b", "c", "manual", "fast_lane", "default"])
                .prop_map(String::from),
            2 => prop::collection::vec(prop::sample::select(alphabet), 1..=64)
                .prop_map(|cs| cs.into_iter().collect::<String>()),
        ]
        .prop_map(|s| LaneName::new(&s).expect("generated lane names are valid"))
    }

    /// A chain `ClaimChain::parse` can yield: distinct names, non-empty unless wildcard.
    pub(crate) fn claim_chain() -> impl Strategy<Value = ClaimChain> {
        (prop::collection::vec(lane_name(), 0..6), any::<bool>()).prop_map(|(names, star)| {
            let mut distinct: Vec<LaneName> = Vec::new();
            for n in names {
                if !distinct.contains(&n) {
                    distinct.push(n);
                }
            }
            if star || distinct.is_empty() {
                ClaimChain::Preference(distinct)
            } else {
                ClaimChain::Filter(distinct)
            }
        })
    }

    proptest! {
        #[test]
        fn display_round_trips_through_parse(chain in claim_chain()) {
            let text = chain.to_string();
            prop_assert_eq!(ClaimChain::parse("chain", &text), Ok(chain.clone()));
            let padded = format!(" \t{text}\n");
            prop_assert_eq!(ClaimChain::parse("chain", &padded), Ok(chain));
        }

        #[test]
        fn parse_accepts_only_canonical_text(
            chars in prop::collection::vec(
                prop::sample::select(vec!['a', 'b', 'c', '*', '>', ' ', '_', '-']),
                0..12,
            )
        ) {
            let text: String = chars.into_iter().collect();
            if let Ok(chain) = ClaimChain::parse("chain", &text) {
                prop_assert_eq!(chain.to_string(), text.trim());
            }
        }
    }
}
