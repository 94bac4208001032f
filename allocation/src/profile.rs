//! Profiles: how a group's 4096 entries are shared among its traffic managers (largest-remainder targets).
//!
//! A profile yields a weight per TM; the weights of the real-valued profiles
//! are quantised to integers (2^40 for the largest), `uniform` and `weighted`
//! use their integers as they are, and the weights are turned into entry counts that sum exactly to
//! the table size by the largest-remainder method, ties going to the lower
//! TM position. Floating point is used only to evaluate a profile's density;
//! everything after quantisation is exact integer arithmetic, so every node
//! computes the same targets.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ProfileError;

/// The scale of the largest quantised weight.
const QUANTUM: f64 = (1u64 << 40) as f64;

/// How a group's entries are shared among its TMs (in group order: the order
/// of the `[[tm]]` list, restricted to the group's members).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Profile {
    /// Every TM the same share.
    #[default]
    Uniform,
    /// Shares proportional to each TM's `weight` (its capacity).
    Weighted,
    /// A Gaussian over the TM position `i`: weight `exp(-(i - mean)² / 2σ²)`.
    Gaussian {
        /// Centre, in TM positions (default: the middle, `(n - 1) / 2`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mean: Option<f64>,
        /// Spread, in TM positions (default: `n / 4`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sigma: Option<f64>,
    },
    /// A Rayleigh distribution over TM positions: TM `i` gets the
    /// probability mass of the interval `[i, i + 1)`,
    /// `exp(-i² / 2σ²) - exp(-(i + 1)² / 2σ²)`.
    Rayleigh {
        /// Scale (the mode), in TM positions (default: `n / 4`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sigma: Option<f64>,
    },
    /// Explicit non-negative weights, one per TM in group order.
    Custom {
        /// The weights.
        weights: Vec<f64>,
    },
}

impl Profile {
    /// The profile's name (`uniform`, `weighted`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Uniform => "uniform",
            Profile::Weighted => "weighted",
            Profile::Gaussian { .. } => "gaussian",
            Profile::Rayleigh { .. } => "rayleigh",
            Profile::Custom { .. } => "custom",
        }
    }

    /// Checks the profile's parameters for a group of `members` TMs: `mean`
    /// finite, `sigma` finite and > 0, a `custom` profile with exactly one
    /// finite weight >= 0 per member. The error names the parameter. Tables
    /// hold only profiles that pass ([`crate::AllocationTable::from_parts`]),
    /// so a table file never carries a value TOML cannot write (`NaN`).
    pub fn validate(&self, members: usize) -> Result<(), ProfileError> {
        match self {
            Profile::Uniform | Profile::Weighted => {}
            Profile::Gaussian { mean, sigma } => {
                if let Some(m) = mean {
                    check("mean", *m, false)?;
                }
                if let Some(s) = sigma {
                    check("sigma", *s, true)?;
                }
            }
            Profile::Rayleigh { sigma } => {
                if let Some(s) = sigma {
                    check("sigma", *s, true)?;
                }
            }
            Profile::Custom { weights } => {
                if weights.len() != members {
                    return Err(ProfileError::CustomLength {
                        given: weights.len(),
                        tms: members,
                    });
                }
                for (i, &w) in weights.iter().enumerate() {
                    if !w.is_finite() || w < 0.0 {
                        return Err(ProfileError::InvalidParameter {
                            name: format!("weights[{i}]"),
                            value: w,
                            reason: "must be a finite number >= 0",
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Real-valued weights for `n` TMs whose capacities are `capacity`.
    fn densities(&self, capacity: &[u32]) -> Result<Vec<f64>, ProfileError> {
        let n = capacity.len();
        if n == 0 {
            return Err(ProfileError::NoTms);
        }
        self.validate(n)?;
        let nf = n as f64;
        Ok(match self {
            Profile::Uniform => vec![1.0; n],
            Profile::Weighted => capacity.iter().map(|&w| f64::from(w)).collect(),
            Profile::Gaussian { mean, sigma } => {
                let mean = check("mean", mean.unwrap_or((nf - 1.0) / 2.0), false)?;
                let sigma = check("sigma", sigma.unwrap_or(nf / 4.0), true)?;
                (0..n)
                    .map(|i| {
                        let z = (i as f64 - mean) / sigma;
                        (-0.5 * z * z).exp()
                    })
                    .collect()
            }
            Profile::Rayleigh { sigma } => {
                let sigma = check("sigma", sigma.unwrap_or(nf / 4.0), true)?;
                let tail = |x: f64| (-(x * x) / (2.0 * sigma * sigma)).exp();
                (0..n)
                    .map(|i| tail(i as f64) - tail(i as f64 + 1.0))
                    .collect()
            }
            Profile::Custom { weights } => weights.clone(),
        })
    }

    /// Integer weights: the capacities themselves for `uniform` (all 1) and
    /// `weighted`; for the other profiles, densities scaled so the largest
    /// is 2^40, rounded.
    pub fn quantised_weights(&self, capacity: &[u32]) -> Result<Vec<u64>, ProfileError> {
        match self {
            Profile::Uniform if !capacity.is_empty() => return Ok(vec![1; capacity.len()]),
            Profile::Weighted if capacity.iter().any(|&w| w > 0) => {
                return Ok(capacity.iter().map(|&w| u64::from(w)).collect())
            }
            _ => {}
        }
        let d = self.densities(capacity)?;
        let max = d.iter().copied().fold(0.0f64, f64::max);
        if max <= 0.0 {
            return Err(ProfileError::NoEntries);
        }
        Ok(d.iter()
            .map(|&x| (x / max * QUANTUM).round() as u64)
            .collect())
    }

    /// Target entry counts for `capacity.len()` TMs, summing to `total`.
    pub fn targets(&self, capacity: &[u32], total: u32) -> Result<Vec<u32>, ProfileError> {
        largest_remainder(&self.quantised_weights(capacity)?, total)
    }

    /// The profile's parameters as `key=value` text, for humans.
    pub fn describe(&self) -> String {
        match self {
            Profile::Uniform | Profile::Weighted => self.name().to_string(),
            Profile::Gaussian { mean, sigma } => format!(
                "gaussian (mean {}, sigma {})",
                opt(mean, "centre"),
                opt(sigma, "n/4")
            ),
            Profile::Rayleigh { sigma } => format!("rayleigh (sigma {})", opt(sigma, "n/4")),
            Profile::Custom { weights } => format!("custom {weights:?}"),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl FromStr for Profile {
    type Err = ProfileError;

    /// Parses a bare profile name with default parameters.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "uniform" => Profile::Uniform,
            "weighted" => Profile::Weighted,
            "gaussian" => Profile::Gaussian {
                mean: None,
                sigma: None,
            },
            "rayleigh" => Profile::Rayleigh { sigma: None },
            "custom" => Profile::Custom {
                weights: Vec::new(),
            },
            other => return Err(ProfileError::Unknown(other.to_string())),
        })
    }
}

fn opt(v: &Option<f64>, default: &str) -> String {
    v.map(|x| x.to_string())
        .unwrap_or_else(|| default.to_string())
}

fn check(name: &str, value: f64, positive: bool) -> Result<f64, ProfileError> {
    if !value.is_finite() || (positive && value <= 0.0) {
        return Err(ProfileError::InvalidParameter {
            name: name.to_string(),
            value,
            reason: if positive {
                "must be a finite number > 0"
            } else {
                "must be a finite number"
            },
        });
    }
    Ok(value)
}

/// Apportions `total` among `weights` by the largest-remainder (Hamilton)
/// method: each gets `floor(total · w / Σw)`, and the leftover units go to the
/// largest remainders, ties to the lower position. Exact integer arithmetic.
///
/// A zero weight always gets zero. All weights zero is an error.
pub fn largest_remainder(weights: &[u64], total: u32) -> Result<Vec<u32>, ProfileError> {
    if weights.is_empty() {
        return Err(ProfileError::NoTms);
    }
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return Err(ProfileError::NoEntries);
    }
    let t = u128::from(total);
    let mut out = Vec::with_capacity(weights.len());
    let mut rems = Vec::with_capacity(weights.len());
    let mut given: u128 = 0;
    for (i, &w) in weights.iter().enumerate() {
        let num = t * u128::from(w);
        let q = num / sum;
        given += q;
        out.push(q as u32);
        rems.push((num % sum, i));
    }
    // Largest remainder first; equal remainders: lower position first.
    rems.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = (t - given) as usize;
    for &(_, i) in rems.iter().take(left) {
        out[i] += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uniform_8() {
        let t = Profile::Uniform.targets(&[1; 8], 4096).expect("targets");
        assert_eq!(t, vec![512; 8]);
    }

    #[test]
    fn uniform_3_remainders_go_to_lowest() {
        let t = Profile::Uniform.targets(&[1; 3], 4096).expect("targets");
        assert_eq!(t, vec![1366, 1365, 1365]);
    }

    #[test]
    fn weighted_with_zero() {
        let t = Profile::Weighted
            .targets(&[1, 0, 3], 4096)
            .expect("targets");
        assert_eq!(t, vec![1024, 0, 3072]);
        assert_eq!(
            Profile::Weighted.targets(&[0, 0], 4096),
            Err(ProfileError::NoEntries)
        );
    }

    #[test]
    fn gaussian_is_symmetric_and_peaks_in_the_middle() {
        let g = Profile::Gaussian {
            mean: None,
            sigma: None,
        };
        let t = g.targets(&[1; 8], 4096).expect("targets");
        assert_eq!(t.iter().sum::<u32>(), 4096);
        for i in 0..4 {
            // Mirror images differ by at most the one rounding unit.
            assert!(t[i].abs_diff(t[7 - i]) <= 1, "{t:?}");
        }
        assert!(t[3] > t[2] && t[2] > t[1] && t[1] > t[0], "{t:?}");
    }

    #[test]
    fn rayleigh_peaks_near_sigma() {
        let t = Profile::Rayleigh { sigma: Some(2.0) }
            .targets(&[1; 8], 4096)
            .expect("targets");
        assert_eq!(t.iter().sum::<u32>(), 4096);
        let peak = (0..8).max_by_key(|&i| t[i]).expect("peak");
        assert!((1..=2).contains(&peak), "{t:?}");
        assert!(t[0] > 0, "{t:?}");
    }

    #[test]
    fn bad_parameters() {
        let g = Profile::Gaussian {
            mean: None,
            sigma: Some(0.0),
        };
        assert!(matches!(
            g.targets(&[1; 4], 4096),
            Err(ProfileError::InvalidParameter { .. })
        ));
        let c = Profile::Custom {
            weights: vec![1.0, -1.0],
        };
        assert!(matches!(
            c.targets(&[1; 2], 4096),
            Err(ProfileError::InvalidParameter { .. })
        ));
        let c = Profile::Custom { weights: vec![1.0] };
        assert_eq!(
            c.targets(&[1; 2], 4096),
            Err(ProfileError::CustomLength { given: 1, tms: 2 })
        );
        assert_eq!(
            Profile::Uniform.targets(&[], 4096),
            Err(ProfileError::NoTms)
        );
        assert!("bogus".parse::<Profile>().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Brute-force reference: the largest-remainder result is the unique
        /// apportionment with every count in {floor(q), floor(q) + 1} that
        /// gives the extra units to the largest fractional parts.
        #[test]
        fn largest_remainder_properties(weights in prop::collection::vec(0u64..1_000_000, 1..=256)) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let t = largest_remainder(&weights, 4096).expect("targets");
            prop_assert_eq!(t.iter().map(|&x| u64::from(x)).sum::<u64>(), 4096);
            let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
            let mut min_extra_rem = u128::MAX;
            let mut max_plain_rem = 0u128;
            for (i, &w) in weights.iter().enumerate() {
                let num = 4096 * u128::from(w);
                let floor = (num / sum) as u32;
                prop_assert!(t[i] == floor || t[i] == floor + 1, "tm {} got {} for quota floor {}", i, t[i], floor);
                if w == 0 { prop_assert_eq!(t[i], 0); }
                if t[i] == floor + 1 { min_extra_rem = min_extra_rem.min(num % sum); }
                else { max_plain_rem = max_plain_rem.max(num % sum); }
            }
            // Nobody left without the extra unit had a strictly larger remainder.
            if min_extra_rem != u128::MAX { prop_assert!(max_plain_rem <= min_extra_rem); }
        }

        #[test]
        fn profiles_always_sum(n in 1usize..=256, sigma in 0.1f64..300.0, mean in -10.0f64..300.0) {
            for p in [
                Profile::Uniform,
                Profile::Gaussian { mean: Some(mean), sigma: Some(sigma) },
                Profile::Gaussian { mean: None, sigma: None },
                Profile::Rayleigh { sigma: Some(sigma) },
            ] {
                match p.targets(&vec![1; n], 4096) {
                    Ok(t) => prop_assert_eq!(t.iter().sum::<u32>(), 4096),
                    Err(e) => prop_assert_eq!(e, ProfileError::NoEntries),
                }
            }
        }
    }
}
