defmodule Ottla.Testing.TimeoutError do
  @moduledoc """
  Raised by `Ottla.Testing`'s wait helpers when what they wait for has not happened within
  their `:timeout`: the message names what they waited for and what they saw last.
  """
  defexception [:message]
end
