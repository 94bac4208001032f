//! Statistics for the simulation's fidelity checks: a seeded generator and the chi-square test.

/// SplitMix64: small, fast, and the same sequence on every machine for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Chi-square statistic and degrees of freedom of `observed` against
/// `expected` (cells with no expectation are left out).
pub fn chi_square(observed: &[u64], expected: &[f64]) -> (f64, usize) {
    let mut x = 0.0;
    let mut cells = 0usize;
    for (&o, &e) in observed.iter().zip(expected) {
        if e > 0.0 {
            x += (o as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    (x, cells.saturating_sub(1))
}

/// P(χ² ≥ x) for `dof` degrees of freedom: the regularised upper incomplete
/// gamma function Q(dof/2, x/2) (series below a + 1, continued fraction above).
pub fn chi_square_p(x: f64, dof: usize) -> f64 {
    if dof == 0 {
        return 1.0;
    }
    let a = dof as f64 / 2.0;
    let x = x / 2.0;
    if x <= 0.0 {
        return 1.0;
    }
    let ln_front = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term < sum * 1e-15 {
                break;
            }
        }
        (1.0 - sum * ln_front.exp()).clamp(0.0, 1.0)
    } else {
        // Lentz's method for the continued fraction.
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (ln_front.exp() * h).clamp(0.0, 1.0)
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn chi_square_p_matches_tables() {
        // Critical values at p = 0.05 and 0.001 (standard tables).
        for (x, dof, p) in [
            (3.841, 1, 0.05),
            (14.067, 7, 0.05),
            (24.322, 7, 0.001),
            (43.773, 30, 0.05),
            (59.703, 30, 0.001),
            (0.0, 3, 1.0),
        ] {
            let got = chi_square_p(x, dof);
            assert!((got - p).abs() < 2e-4, "x={x} dof={dof}: {got} vs {p}");
        }
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn rng_is_seeded_and_spread() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let mut counts = [0u64; 8];
        for _ in 0..80_000 {
            counts[a.range(0, 7) as usize] += 1;
        }
        let (x, dof) = chi_square(&counts, &[10_000.0; 8]);
        assert!(chi_square_p(x, dof) > 0.001, "{counts:?}");
    }
}
