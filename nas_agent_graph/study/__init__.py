"""The study's rules, apart from the graph that applies them, each testable on an AgentState:

- rules.py: the run record and its acceptance, the stop rules, what proposers see of runs in flight;
- confirmation.py: multi-seed confirmation of a run that beats the incumbent (--confirm-seeds);
- reward.py: the reward of a run, for the LLM's LoRA samples;
- incumbent.py: config.py and model.py kept in line with the study's best run;
- store.py: saving the study, its Optuna mirror, and its clock.
"""
