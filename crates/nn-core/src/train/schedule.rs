//! Learning-rate schedules, evaluated once per iteration.
//!
//! A [`Schedule`] is a plain value (serialisable with serde, stored in the run config and the
//! summary). [`Schedule::lr_at`] maps the base learning rate, the global iteration `step`
//! (0-based, the update about to be made), the total number of iterations and the number of
//! iterations per epoch to the learning rate of that update. Positions in schedules are given
//! in epochs (possibly fractional) so a config does not depend on the batch size.
//!
//! | variant | lr at `step` (`e = step / steps_per_epoch`, `f = step / total_steps`) |
//! |---|---|
//! | `Constant` | `base` |
//! | `Step { milestones, gamma }` | `base * gamma^(number of milestones <= e)` (PyTorch `MultiStepLR`) |
//! | `Cosine { min_lr }` | `min_lr + (base - min_lr) * (1 + cos(pi * f)) / 2` (`CosineAnnealingLR` per iteration) |
//! | `Linear { end_factor }` | `base * (1 + (end_factor - 1) * f)` |
//! | `Warmup { epochs, start_factor, then }` | `then(step) * w`, `w = start_factor + (1 - start_factor) * min(1, step / warmup_steps)` |
//!
//! The warmup multiplies the wrapped schedule (like chaining PyTorch's `LinearLR` with another
//! scheduler), so milestones stay at the same absolute epochs.

use serde::{Deserialize, Serialize};

/// A learning-rate schedule (see the [module docs](self) for the formulas).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The base learning rate throughout.
    #[default]
    Constant,
    /// Multiply by `gamma` at each milestone epoch.
    Step {
        /// Epochs at whose first iteration the rate is multiplied by `gamma` (e.g. `[100, 150]`).
        milestones: Vec<f64>,
        /// The decay factor (e.g. 0.1).
        gamma: f64,
    },
    /// Cosine annealing from the base rate to `min_lr` over the whole run.
    Cosine {
        /// The final learning rate (absolute, not a factor).
        min_lr: f64,
    },
    /// Linear decay from the base rate to `base * end_factor` over the whole run.
    Linear {
        /// The final rate as a fraction of the base rate.
        end_factor: f64,
    },
    /// Linear warmup over the first `epochs` epochs, multiplying the wrapped schedule.
    Warmup {
        /// Warmup length in epochs (fractional allowed; at least one iteration when > 0).
        epochs: f64,
        /// The multiplier at step 0 (e.g. 0.01 or 0.1).
        start_factor: f64,
        /// The schedule being warmed up.
        then: Box<Schedule>,
    },
}

impl Schedule {
    /// PyTorch-style step decay at `milestones` (epochs).
    pub fn step(milestones: &[usize], gamma: f64) -> Self {
        Schedule::Step {
            milestones: milestones.iter().map(|&m| m as f64).collect(),
            gamma,
        }
    }

    /// Cosine annealing to `min_lr`.
    pub fn cosine(min_lr: f64) -> Self {
        Schedule::Cosine { min_lr }
    }

    /// This schedule preceded by a linear warmup of `epochs` epochs starting at
    /// `start_factor` times the rate.
    pub fn with_warmup(self, epochs: f64, start_factor: f64) -> Self {
        Schedule::Warmup {
            epochs,
            start_factor,
            then: Box::new(self),
        }
    }

    /// The learning rate for the update at global iteration `step` (0-based) of a run of
    /// `total_steps` iterations with `steps_per_epoch` iterations per epoch.
    pub fn lr_at(&self, base_lr: f64, step: usize, total_steps: usize, steps_per_epoch: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        let frac = if total_steps == 0 {
            0.0
        } else {
            (step as f64 / total_steps as f64).min(1.0)
        };
        match self {
            Schedule::Constant => base_lr,
            Schedule::Step { milestones, gamma } => {
                // compare in iterations to avoid rounding surprises with fractional epochs
                let n = milestones.iter().filter(|&&m| (m * spe).round() as usize <= step).count();
                base_lr * gamma.powi(n as i32)
            }
            Schedule::Cosine { min_lr } => min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
            Schedule::Linear { end_factor } => base_lr * (1.0 + (end_factor - 1.0) * frac),
            Schedule::Warmup {
                epochs,
                start_factor,
                then,
            } => {
                let inner = then.lr_at(base_lr, step, total_steps, steps_per_epoch);
                let warm = if *epochs > 0.0 { (epochs * spe).round().max(1.0) } else { 0.0 };
                if (step as f64) < warm {
                    inner * (start_factor + (1.0 - start_factor) * step as f64 / warm)
                } else {
                    inner
                }
            }
        }
    }

    /// A short human-readable description (`"cosine(min 0)"`, `"warmup 5ep + step[100, 150]x0.1"`).
    pub fn describe(&self) -> String {
        match self {
            Schedule::Constant => "constant".into(),
            Schedule::Step { milestones, gamma } => format!("step{milestones:?}x{gamma}"),
            Schedule::Cosine { min_lr } => format!("cosine(min {min_lr})"),
            Schedule::Linear { end_factor } => format!("linear(to x{end_factor})"),
            Schedule::Warmup {
                epochs,
                start_factor,
                then,
            } => format!("warmup {epochs}ep from x{start_factor} + {}", then.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn step_cosine_linear_values() {
        let s = Schedule::step(&[2, 3], 0.1);
        // 10 steps per epoch: drop at step 20 and 30
        close(s.lr_at(0.1, 19, 50, 10), 0.1);
        close(s.lr_at(0.1, 20, 50, 10), 0.01);
        close(s.lr_at(0.1, 29, 50, 10), 0.01);
        close(s.lr_at(0.1, 30, 50, 10), 0.001);
        let c = Schedule::cosine(0.0);
        close(c.lr_at(1.0, 0, 100, 10), 1.0);
        close(c.lr_at(1.0, 50, 100, 10), 0.5);
        close(c.lr_at(1.0, 100, 100, 10), 0.0);
        close(
            Schedule::cosine(0.1).lr_at(1.0, 25, 100, 10),
            0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
        );
        close(Schedule::Linear { end_factor: 0.0 }.lr_at(2.0, 25, 100, 10), 1.5);
        close(Schedule::Constant.lr_at(0.3, 77, 100, 10), 0.3);
    }

    #[test]
    fn warmup_multiplies_the_wrapped_schedule_and_serialises() {
        let s = Schedule::cosine(0.0).with_warmup(1.0, 0.1);
        // 4 warmup steps
        close(s.lr_at(1.0, 0, 100, 4), 0.1);
        let inner2 = Schedule::cosine(0.0).lr_at(1.0, 2, 100, 4);
        close(s.lr_at(1.0, 2, 100, 4), inner2 * (0.1 + 0.9 * 0.5));
        close(s.lr_at(1.0, 4, 100, 4), Schedule::cosine(0.0).lr_at(1.0, 4, 100, 4));
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"warmup\""), "{j}");
        let back: Schedule = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        let st: Schedule = serde_json::from_str(r#"{"kind":"step","milestones":[100,150],"gamma":0.1}"#).unwrap();
        assert_eq!(st, Schedule::step(&[100, 150], 0.1));
    }
}
