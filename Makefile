# make demo   set up .venv and run the tiny SFT demo (2 gloo ranks, ZeRO-2, CPU)
# make test   set up .venv and run the whole test suite (unit, dist, ray, slurm; gpu tests skip without CUDA)
PY := .venv/bin/python

.PHONY: setup demo test test-unit
setup:
	bash launch/setup.sh

demo: setup
	$(PY) launch/demo.py $(ARGS)

test: setup
	bash launch/test.sh

test-unit: setup
	$(PY) -m pytest -q -m unit
