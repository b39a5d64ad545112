"""A learner's answers, for the browser and hub tests: the released exercise notebook with the
answer cells filled in from the instructor's source notebook, solution markers removed."""

MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


def solution_code(source_nb):
    """grade_id -> the source's code for each answer cell, without nbgrader's markers."""
    return {c.metadata["nbgrader"]["grade_id"]:
            "\n".join(line for line in c.source.splitlines() if line.strip() not in MARKERS)
            for c in source_nb.cells
            if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("solution")}


def answer(exercise_nb, source_nb):
    """Fill every answer cell of `exercise_nb` (in place) with the source's solution code.
    Returns the grade_ids that were filled."""
    solutions = solution_code(source_nb)
    filled = []
    for cell in exercise_nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.cell_type == "code" and grade_id in solutions:
            cell.source = solutions[grade_id]
            filled.append(grade_id)
    assert filled, "the exercise has no answer cells matching the source notebook"
    return filled
