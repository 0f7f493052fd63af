"""The recipes Swagger UI offers are ones the API accepts."""
import pytest

from api.examples import JOB_EXAMPLES
from core.recipe import parse_recipe


@pytest.mark.parametrize("name", sorted(JOB_EXAMPLES))
def test_every_example_recipe_is_valid(name):
    example = JOB_EXAMPLES[name]
    assert example["summary"]
    recipe = parse_recipe(example["value"]["recipe"])
    if recipe.needs_calibration():
        assert "calibration_dataset_id" in example["value"]


def test_swagger_offers_the_examples_for_submit():
    from api.main import create_app

    spec = create_app().openapi()
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == set(JOB_EXAMPLES)
