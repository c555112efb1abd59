# make demo   set up .venv and run the tiny SFT demo (2 gloo ranks, ZeRO-2, CPU)
# make test   set up .venv and run the whole test suite (unit, dist, ray, slurm; gpu tests skip without CUDA)
# make gpu-wheels     the wheels a GPU machine's image lacks, into .gpu-wheels/ (see benchmarks/gpu_check.sh)
# make gpu-check-dry  benchmarks/gpu_check.sh --dry: every GPU check's CPU version, results in gpu-check-dry/
PY := .venv/bin/python

.PHONY: setup demo test test-unit gpu-wheels gpu-check-dry
setup:
	bash launch/setup.sh

demo: setup
	$(PY) launch/demo.py $(ARGS)

test: setup
	bash launch/test.sh

test-unit: setup
	$(PY) -m pytest -q -m unit

gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

gpu-check-dry: gpu-wheels
	bash benchmarks/gpu_check.sh --dry gpu-check-dry
