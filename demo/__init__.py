"""The built-in demo: the procedural task (task.py) that `python pipeline.py` trains and evaluates
on. General code never imports it; its hooks are passed by name (--metric demo.task:scene_list_ok)."""
