"""Orchestration across stages (export, then trust fitting; ensembles; the release build): the only
package that calls both training/export and trust, so the stages below stay one-directional."""
